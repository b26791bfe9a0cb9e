"""GGUF models on the CPU: kernelhub (packed and dequantised) vs transformers vs llama.cpp.

    .venv/bin/python bench/gguf_models.py                       # SmolLM2 Q4_1 and Gemma 3 270M Q4_K_M, every engine
    .venv/bin/python bench/gguf_models.py --models smollm2 --engines packed,transformers --new-tokens 16

For each model and engine, in its own process (so resident memory is that engine's alone): decode
tokens/s at batch 1 and 8 (greedy, `--new-tokens` tokens after a 16-token prompt, end-of-sequence
ignored; `b * (n - 1) / (t(n) - t(1))`), prefill ms for a 128-token prompt (generating one token),
and resident memory (RSS after loading and one warm-up generate, minus RSS before loading). Times
are medians of `--repeat` runs. Engines:

- `packed`: kernelhub, `dequantize=False` (projections stay in ggml blocks, the `gguf` kernel);
- `compiled`: the same model, `generate(cache="static", compile=True)`, measured as a long-running
  process runs it: its graphs pinned from their first call (`KERNELHUB_PIN_AFTER_STEPS=0`, set here
  unless the environment sets it: by default a graph gets its pinned twin, which skips dynamo's
  guards on the model, only after 4096 steps, `kernelhub/runtime/pinned_step.py`);
- `dequantized`: kernelhub, `dequantize=True` (float32 weights);
- `transformers`: its own GGUF load in float32 (offline: without its Hub GGUF kernel it dequantises);
- `llama.cpp`: llama-cpp-python on the same file with the same thread count (batch 1 only), when it
  is installed (`pip install -e .[bench]`).

Then ratios (ours vs llama.cpp, packed vs dequantised) and the bandwidth limit: the packed bytes a
decode step reads (every tensor of the file but the token embedding, which a step reads one row of,
unless the output layer is tied to it) divided by the read bandwidth measured here (a 256 MiB
float32 tensor summed on the same threads: a step only reads its weights), and each engine's batch-1
decode as a share of that limit. The copy bandwidth (read + write bytes of a 256 MiB copy) is
printed beside it.

`--rounds N` runs every engine N times in turn and keeps each figure's best (the fastest decode, the
shortest prefill): on a machine other work shares, a disturbance then has to hit every round of an
engine to show in its row.

`--avx2-torch` runs torch's MKL and inductor's generated code at AVX2 width in every engine's
process. On an AVX-512 CPU, MKL's AVX-512 code (in torch's CPU attention) and inductor's slowed the
packed products that ran after them by about 20%; the packed kernel keeps its AVX-512 build.

(This file is not `bench/gguf.py`: a script's folder comes first on `sys.path`, where that name
would hide the `gguf` package every engine imports.)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("KERNELHUB_PIN_AFTER_STEPS", "0")  # the steady state of a long-running process (above)
ENGINES = ("packed", "compiled", "dequantized", "transformers", "llama.cpp")
MODELS = {"smollm2": "SmolLM2-135M Q4_1", "gemma3": "Gemma 3 270M Q4_K_M"}
INSTALL = "llama-cpp-python not installed: pip install -e .[bench]"
TEXT = ("The history of computing is a story of machines that learned to count, then to remember, and "
        "finally to talk. Early calculators used gears and levers; later ones used relays and tubes. ")


def model_path(key: str):
    from kernelhub.testing import samples

    return samples.smollm2_gguf() if key == "smollm2" else samples.gemma3_gguf()


def rss() -> int:
    """Resident bytes of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns, repeat: int) -> list[float]:
    """Median seconds of each function, run in turn so load from other processes hits all alike."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


def read_bandwidth(mib: int = 256) -> float:
    """Bytes per second of reading a large tensor once (a sum: next to no work per byte; best of 5)."""
    src = torch.rand(mib << 18)
    src.sum()
    return src.nbytes / min(median_time(lambda: src.sum(), 1) for _ in range(5))


def copy_bandwidth(mib: int = 256) -> float:
    """Bytes per second of a large torch copy, counting bytes read plus bytes written (best of 5)."""
    src = torch.rand(mib << 18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.nbytes / min(median_time(lambda: dst.copy_(src), 1) for _ in range(5))


def bytes_per_token(path) -> int:
    """Packed bytes a decode step reads: every tensor of the file but the token embedding (one row is
    read), which counts in full when the output layer is tied to it."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if name != "token_embd.weight" or tied)


def prompts(tokenizer, length: int, batch: int) -> torch.Tensor:
    ids = tokenizer(TEXT * (1 + length // 20), add_special_tokens=False)["input_ids"][:length]
    return torch.tensor([ids] * batch)


# -- one engine in this process ---------------------------------------------------------------

def load(engine: str, path):
    """(generate(ids, n) -> None, note) for `engine`; `ids` is [batch, length]."""
    import kernelhub

    if engine in ("packed", "compiled", "dequantized"):
        model = kernelhub.from_pretrained(path, dequantize=engine == "dequantized")
        options = {"cache": "static", "compile": True} if engine == "compiled" else {}

        def run(ids, n):
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=n, eos_token_id=None, **options)
        return run, ""
    if engine == "transformers":
        os.environ["HF_HUB_OFFLINE"] = "1"  # no Hub kernel lookup: it dequantises on the CPU
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        packed = any(type(m).__name__ == "GgufLinear" for m in model.modules())

        def run(ids, n):
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                               min_new_tokens=n, do_sample=False, pad_token_id=0)
        return run, "packed (GgufLinear)" if packed else "dequantised"
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=torch.get_num_threads(), n_threads_batch=torch.get_num_threads(),
                n_ctx=512, n_batch=512, verbose=False)

    def run(ids, n):
        if ids.shape[0] != 1:
            raise NotImplementedError("llama-cpp-python generates one sequence at a time")
        llm.reset()
        llm.eval(ids[0].tolist())
        for _ in range(n - 1):
            llm.eval([llm.sample(temp=0.0)])
    return run, ""


def worker(model_key: str, engine: str, new_tokens: int, repeat: int) -> dict:
    import kernelhub

    path = model_path(model_key)
    tokenizer = kernelhub.load_tokenizer(path)
    gc.collect()
    before = rss()
    run, note = load(engine, path)
    long_prompt, out = prompts(tokenizer, 128, 1), {"note": note}
    run(long_prompt, 1)  # warm-up (and, compiled, the first compilation)
    out["rss_mb"] = (rss() - before) / 2**20
    out["prefill_ms"] = 1e3 * median_time(lambda: run(long_prompt, 1), repeat)
    for batch in (1, 8):
        ids = prompts(tokenizer, 16, batch)
        try:
            run(ids, 1), run(ids, new_tokens)  # warm-up: each shape compiles once
        except NotImplementedError as e:
            out[f"decode{batch}"], out["note"] = None, str(e)
            continue
        one, many = interleaved([lambda ids=ids: run(ids, 1), lambda ids=ids: run(ids, new_tokens)], repeat)
        out[f"decode{batch}"] = batch * (new_tokens - 1) / (many - one) if many > one else None  # None: too noisy
    return out


# -- the driver ------------------------------------------------------------------------------

def run_engine(model_key, engine, args) -> dict:
    command = [sys.executable, __file__, "--worker", model_key, engine, "--new-tokens", str(args.new_tokens),
               "--repeat", str(args.repeat), "--threads", str(args.threads)] + ["--avx2-torch"] * args.avx2_torch
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {args.timeout} s (--timeout)"}
    lines = [x for x in done.stdout.splitlines() if x.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"failed ({tail[:120]})"}
    return json.loads(lines[-1])


def best_of(runs: list[dict]) -> dict:
    """Each figure's best over one engine's rounds (resident memory and note from the first round that
    finished), or the first round's error where none finished."""
    done = [r for r in runs if "error" not in r]
    if not done:
        return runs[0]
    best = dict(done[0], prefill_ms=min(r["prefill_ms"] for r in done))
    for key in ("decode1", "decode8"):
        values = [r[key] for r in done if r[key] is not None]
        best[key] = max(values) if values else None
    return best


def cell(value, fmt) -> str:
    return "-" if value is None else format(value, fmt)


def ratio(a, b) -> str:
    return "-" if a is None or b is None or not b else f"{a / b:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2,gemma3", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated: {', '.join(ENGINES)}")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="runs of every engine, in turn; each figure's best")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds each engine's process may take")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and llama.cpp threads")
    parser.add_argument("--avx2-torch", action="store_true",
                        help="torch's MKL and inductor's code at AVX2 width in every engine "
                             "(MKL_ENABLE_INSTRUCTIONS=AVX2, inductor cpp.simdlen=256); our kernel keeps AVX-512")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.avx2_torch:  # before MKL's first call; a worker inherits both
        os.environ["MKL_ENABLE_INSTRUCTIONS"] = "AVX2"
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = 256
    if args.worker:
        print(json.dumps(worker(*args.worker, args.new_tokens, args.repeat)))
        return
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: at least 1")
    models, engines = args.models.split(","), args.engines.split(",")
    for name, valid in ((models, MODELS), (engines, ENGINES)):
        unknown = [x for x in name if x not in valid]
        if unknown:
            parser.error(f"unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
    if "llama.cpp" in engines:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print(INSTALL)
            engines.remove("llama.cpp")
    bandwidth = read_bandwidth()
    print("torch's MKL and inductor code at AVX2 width (--avx2-torch); " * args.avx2_torch, end="")
    print(f"{torch.get_num_threads()} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s (copy: "
          f"{copy_bandwidth() / 1e9:.1f} GB/s read + write); {args.new_tokens} new tokens, median of {args.repeat}"
          + f"; best of {args.rounds} rounds" * (args.rounds > 1) + "\n")
    header = (f"{'model':<20} {'engine':<13} {'decode b=1':>10} {'decode b=8':>10} {'prefill 128':>11} "
              f"{'RSS delta':>9} {'% of limit':>10}  note")
    print(header + "\n" + "-" * len(header))
    results = {}
    for key in models:
        limit = bandwidth / bytes_per_token(model_path(key))
        rounds = {engine: [] for engine in engines}
        for _ in range(args.rounds):
            for engine in engines:
                rounds[engine].append(run_engine(key, engine, args))
        for engine in engines:
            r = results[key, engine] = best_of(rounds[engine])
            if "error" in r:
                print(f"{MODELS[key]:<20} {engine:<13} {r['error']}", flush=True)
                continue
            share = None if r["decode1"] is None else 100 * r["decode1"] / limit
            print(f"{MODELS[key]:<20} {engine:<13} {cell(r['decode1'], '10.1f')} {cell(r['decode8'], '10.1f')} "
                  f"{r['prefill_ms']:8.1f} ms {r['rss_mb']:6.0f} MB {cell(share, '9.0f')}%  {r['note']}", flush=True)
        print(f"{'':<20} {'limit':<13} {limit:10.1f}  ({bytes_per_token(model_path(key)) / 2**20:.1f} MiB packed "
              "per token / read bandwidth)")
    print("\nratios (decode: higher is better; prefill: lower is better)")
    print(f"{'model':<20} {'ratio':<34} {'decode b=1':>10} {'decode b=8':>10} {'prefill':>8}")
    pairs = [("packed", "llama.cpp"), ("compiled", "llama.cpp"), ("packed", "dequantized"),
             ("compiled", "dequantized"), ("packed", "transformers")]
    for key in models:
        for a, b in pairs:
            ra, rb = results.get((key, a), {}), results.get((key, b), {})
            if "prefill_ms" not in ra or "prefill_ms" not in rb:
                continue
            print(f"{MODELS[key]:<20} {a + ' / ' + b:<34} {ratio(ra['decode1'], rb['decode1']):>10} "
                  f"{ratio(ra['decode8'], rb['decode8']):>10} {ratio(ra['prefill_ms'], rb['prefill_ms']):>8}")


if __name__ == "__main__":
    main()
