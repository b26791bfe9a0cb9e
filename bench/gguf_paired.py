"""Compiled packed decode against llama.cpp, paired: both engines in one process, their calls
alternating, so a slow spell of a shared machine hits both alike.

    .venv/bin/python bench/gguf_paired.py                  # SmolLM2 Q4_1 and Gemma 3 270M Q4_K_M
    .venv/bin/python bench/gguf_paired.py --models gemma3 --pairs 24

`bench/gguf_models.py` runs each engine in its own process, one after the other: on a machine other
work shares, a spell of slower memory or a busier core can last minutes, longer than an engine's
turn, and best-of-rounds only helps when some round of each engine missed every spell. Here each
pair measures kernelhub (`generate(cache="static", compile=True)`, weights packed) and then
llama.cpp (llama-cpp-python, the same file and thread count) back to back, batch 1, greedy, decode
tokens/s as in `gguf_models.py` (`(n - 1) / (t(n) - t(1))`), our graphs pinned from their first call
as there (importing it sets `KERNELHUB_PIN_AFTER_STEPS=0`). Printed: every pair, each engine's
median and best, and the median of the pairs' ratios. Both engines' thread pools live in the one
process: one's threads may still spin for a moment after its call while the other's start.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gguf_models import INSTALL, MODELS, load, model_path, prompts


def decode_rate(run, ids, new_tokens: int) -> float:
    start = time.perf_counter()
    run(ids, 1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    run(ids, new_tokens)
    return (new_tokens - 1) / (time.perf_counter() - start - one)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and llama.cpp threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown {', '.join(unknown)}; valid: {', '.join(MODELS)}")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        parser.exit(1, INSTALL + "\n")
    import kernelhub

    print(f"{args.threads} threads, batch 1, {args.new_tokens} new tokens after a 16-token prompt, {args.pairs} pairs")
    for key in args.models.split(","):
        path = model_path(key)
        ids = prompts(kernelhub.load_tokenizer(path), 16, 1)
        ours, theirs = load("compiled", path)[0], load("llama.cpp", path)[0]
        for run in (ours, theirs):  # warm-up: compiles our step, fills both engines' caches
            run(ids, 1), run(ids, args.new_tokens)
        pairs = [(decode_rate(ours, ids, args.new_tokens), decode_rate(theirs, ids, args.new_tokens))
                 for _ in range(args.pairs)]
        print(f"\n{MODELS[key]}: tokens/s, kernelhub compiled / llama.cpp, pair by pair")
        print("  " + "  ".join(f"{a:.0f}/{b:.0f}" for a, b in pairs))
        for name, rates in (("kernelhub compiled", [a for a, _ in pairs]), ("llama.cpp", [b for _, b in pairs])):
            print(f"  {name:<19} median {statistics.median(rates):6.1f}  best {max(rates):6.1f}")
        print(f"  median of the pairs' ratios {statistics.median(a / b for a, b in pairs):.2f}")


if __name__ == "__main__":
    main()
