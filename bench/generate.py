"""Generation on SmolLM2-135M-Instruct real weights: kernelhub vs transformers 5.22.2.

    .venv/bin/python bench/generate.py

Both load the same GGUF file (dequantised to float32), get the same chat prompts and
generate greedily with the same settings. Printed as ratios from one run:
prefill latency (kernelhub / transformers, lower is better) and decode tokens/s
(kernelhub / transformers, higher is better), for batch 1 and batch 8, with kernelhub's
default kernels and with the oneDNN Linear kernel bound (`kernels={"Linear": "onednn"}`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kernelhub
from kernelhub.testing.samples import smollm2_gguf

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
             "Explain gravity to a child.", "What is 12 times 7?", "List four animals that live in the ocean.",
             "Who wrote Romeo and Juliet?", "Give me a tip for learning to code."]


def prompts(tokenizer, batch):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in QUESTIONS[:batch]]
    tokenizer.padding_side = "left"
    return tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)  # the template wrote them


def interleaved(fns, repeat):
    """Median seconds of each function, run in turn so load drift hits all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def main():
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--attn", default="sdpa")
    args = parser.parse_args()
    path = smollm2_gguf()
    # float weights, as transformers loads them: the same work on both sides (bench/gguf_models.py: packed)
    ours = kernelhub.from_pretrained(path, attn_implementation=args.attn, dequantize=True)
    fast = kernelhub.from_pretrained(path, attn_implementation=args.attn, kernels={"Linear": "onednn"},
                                     dequantize=True)
    tokenizer = kernelhub.load_tokenizer(path, model=ours)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation=args.attn).eval()
    theirs.generation_config.eos_token_id = None  # both generate exactly --new-tokens tokens
    n = args.new_tokens
    print(f"SmolLM2-135M-Instruct, fp32, greedy, {n} new tokens, attn={args.attn}, "
          f"{torch.get_num_threads()} threads\n")
    print(f"{'kernels':8s} {'batch':>5s} {'prompt':>6s}  {'prefill ms (ours/theirs)':>26s} {'ratio':>6s}  "
          f"{'decode tok/s (ours/theirs)':>28s} {'ratio':>6s}  same tokens")
    for (label, model), b in [(m, b) for b in (1, 8) for m in (("default", ours), ("onednn", fast))]:
        batch = prompts(tokenizer, b)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.inference_mode():
            ours_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=n)
            theirs_tokens = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                            pad_token_id=tokenizer.pad_token_id)
            same = ours_tokens.tolist() == theirs_tokens.tolist()
            def ours_run(k, model=model, ids=ids, mask=mask):
                return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=k)

            def theirs_run(k, ids=ids, mask=mask):
                return lambda: theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id)

            p_ours, p_theirs, g_ours, g_theirs = interleaved(
                [ours_run(1), theirs_run(1), ours_run(n), theirs_run(n)], args.repeat)
            decoded = ids.shape[0] * (n - 1)
            d_ours, d_theirs = decoded / (g_ours - p_ours), decoded / (g_theirs - p_theirs)
        print(f"{label:8s} {b:5d} {ids.shape[1]:6d}  {p_ours * 1e3:12.1f} / {p_theirs * 1e3:11.1f} "
              f"{p_ours / p_theirs:6.2f}  "
              f"{d_ours:13.1f} / {d_theirs:12.1f} {d_ours / d_theirs:6.2f}  {same}")


if __name__ == "__main__":
    main()
