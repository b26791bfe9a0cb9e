"""Compiled decoding on CPU, SmolLM2-135M-Instruct real weights: kernelhub eager vs compiled vs
transformers' compiled static-cache generate, and decode speed against the memory-bandwidth limit.

    .venv/bin/python bench/compile.py                      # fp32 and bf16, batch 1 and 8
    .venv/bin/python bench/compile.py --new-tokens 4 --repeat 1 --batches 1 --dtypes float32   # smoke
    .venv/bin/python bench/compile.py --device cuda --batches 1 8 64   # the GPU rows

On a GPU the rows are the same, with the default Linear (the `gemv` kernel is for CPUs), our
compiled steps captured as CUDA graphs, transformers' compile config at its default (CUDA
graphs too), and the limit from the device's own copy bandwidth (HBM).

Rows, per dtype and batch, all greedy with the same left-padded chat prompts:

- **ours eager**: `generate` with a dynamic cache and the `gemv` Linear kernel
  (`kernels={"Linear": ["gemv", "reference"]}`): decode calls of up to 8 rows run its AVX2
  `skinny_linear` kernel, the prefill runs as the oneDNN kernel where oneDNN serves the dtype
  (float32 here), else `F.linear`: the fastest eager setting;
- **ours compiled**: the same model, `generate(cache="static", compile=True)` (inductor, one graph
  per bucket): one-row Linear calls (batch 1) become inductor's fused multiply-reduce over each
  weight, batches of 8 call the `skinny_linear` op inside the graph; measured as a long-running
  process runs it, its graphs pinned from their first call (`KERNELHUB_PIN_AFTER_STEPS=0`, set here
  unless the environment sets it; see `kernelhub/runtime/pinned_step.py`);
- **theirs compiled**: transformers' `generate(cache_implementation="static")` with a
  `CompileConfig` forced on for CPU (inductor, mode "default").

Decode tokens/s = batch x (new - 1) / (time(new tokens) - time(1 token)): the prefill and the
compilations (done in a warm-up call) are not counted. The bandwidth limit is the number of
decode steps per second at which reading every weight once per step saturates memory:
measured copy bandwidth / bytes of weights read per step (every parameter once, the embedding
table only where the output projection reuses it; the KV cache, small here, is left out).
Bandwidth is measured here with a 512 MiB `torch` copy and counted as bytes read plus bytes
written, as STREAM's Copy counts them. All ratios come from one run; numbers move between runs
on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import kernelhub
from kernelhub.testing.samples import smollm2_gguf

os.environ.setdefault("KERNELHUB_PIN_AFTER_STEPS", "0")  # the steady state of a long-running process (above)

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
             "Explain gravity to a child.", "What is 12 times 7?", "List four animals that live in the ocean.",
             "Who wrote Romeo and Juliet?", "Give me a tip for learning to code."]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_bandwidth(device: str = "cpu", mib: int = 512, repeat: int = 5) -> float:
    """Bytes per second moved by the fastest of `repeat` copies of `mib` MiB (read + write)."""
    src = torch.rand(mib << 18, device=device)  # float32: 4 bytes each
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_seconds(lambda: dst.copy_(src)) for _ in range(repeat))
    return 2 * src.nbytes / best


def _seconds(fn) -> float:
    """Wall seconds of `fn()`, with the GPU's queued work finished at both ends."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def weight_bytes(model, embeddings, head) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an embedding table
    that only has rows gathered (unless the output projection shares it)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is embeddings.weight and p.data_ptr() != head.weight.data_ptr():
            continue
        total += p.numel() * p.element_size()
    return total


def prompts(tokenizer, batch):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in (QUESTIONS * 2)[:batch]]
    tokenizer.padding_side = "left"
    return tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)  # the template wrote them


def interleaved(fns, repeat):
    """Fastest seconds of each function over `repeat` rounds, run in turn so load drift hits all alike
    (one warm-up call each; the fastest round is the one least disturbed by other load)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            ts.append(_seconds(fn))
    return [min(ts) for ts in times]


def load(path, dtype, with_transformers, device):
    import transformers

    kernels = {"Linear": ["gemv", "reference"]} if device == "cpu" else None
    # float weights, as transformers loads them: the same work on both sides (bench/gguf_models.py: packed)
    ours = kernelhub.from_pretrained(path, attn_implementation="sdpa", dtype=dtype, kernels=kernels, device=device,
                                     dequantize=True)
    theirs = None
    if with_transformers:
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        theirs.generation_config.eos_token_id = None  # every run makes exactly the tokens asked for
    return ours, theirs


def decode_rates(model, theirs, batch, n, repeat, pad_id):
    """Decode tokens/s of (ours eager, ours compiled, theirs compiled or None) and whether the tokens agree."""
    import transformers

    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    if device.type == "cpu":
        config = transformers.CompileConfig(fullgraph=True, mode="default")
        config._compile_all_devices = True  # transformers compiles on CPU only when asked this way
    else:
        config = transformers.CompileConfig(fullgraph=True)  # its default mode: CUDA graphs

    def ours(model, k, **kw):
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=k, eos_token_id=None, **kw)

    def theirs_run(k):
        return lambda: theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                       do_sample=False, pad_token_id=pad_id, cache_implementation="static",
                                       compile_config=config)

    runs = [ours(model, 1), ours(model, n), ours(model, 1, cache="static", compile=True),
            ours(model, n, cache="static", compile=True)]
    if theirs is not None:
        runs += [theirs_run(1), theirs_run(n)]
    with torch.inference_mode():
        same = runs[1]().tolist() == runs[3]().tolist()
        times = interleaved(runs, repeat)
    decoded = ids.shape[0] * (n - 1)
    rates = [decoded / (times[i + 1] - times[i]) for i in range(0, len(times), 2)]
    return (*rates, None)[:3], same


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' compiled rows")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch")
    path = smollm2_gguf()
    bandwidth = copy_bandwidth(args.device)
    where = (torch.cuda.get_device_name() if args.device == "cuda" else
             f"{torch.get_num_threads()} threads, oneDNN bf16 kernels: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"SmolLM2-135M-Instruct, greedy, {args.new_tokens} new tokens, sdpa, {where}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    header = (f"{'dtype':8s} {'batch':>5s}  {'ours eager':>10s} {'ours comp':>10s} {'theirs comp':>11s}  "
              f"{'comp/eager':>10s} {'comp/theirs':>11s}  {'eager %bw':>9s} {'comp %bw':>8s}  same tokens")
    print(header + "\n" + "-" * len(header))
    by_dtype = {}
    for name in args.dtypes:
        model, theirs = load(path, DTYPES[name], not args.no_transformers, args.device)
        tokenizer = kernelhub.load_tokenizer(path, model=model)
        per_step = weight_bytes(model, model.get_input_embeddings(), model.lm_head)
        print(f"{name}: Linear kernel {model.binding['lm_head'].chosen}")
        limit = bandwidth / per_step  # decode steps per second
        for b in args.batches:
            (e, c, t), same = decode_rates(model, theirs, prompts(tokenizer, b), args.new_tokens, args.repeat,
                                           tokenizer.pad_token_id)
            by_dtype[name, b] = (e, c)
            theirs_rate, vs_theirs = (f"{t:11.1f}", f"{c / t:11.2f}") if t else (f"{'-':>11s}", f"{'-':>11s}")
            print(f"{name:8s} {b:5d}  {e:10.1f} {c:10.1f} {theirs_rate}  {c / e:10.2f} {vs_theirs}  "
                  f"{100 * e / b / limit:8.0f}% "
                  f"{100 * c / b / limit:7.0f}%  {same}")
        print(f"{'':16s}(weights read per step: {per_step / 1e6:.0f} MB, limit {limit:.0f} steps/s)")
    for b in args.batches:
        if ("float32", b) in by_dtype and ("bfloat16", b) in by_dtype:
            (e32, c32), (e16, c16) = by_dtype["float32", b], by_dtype["bfloat16", b]
            print(f"bf16 / fp32 decode at batch {b}: eager {e16 / e32:.2f}, compiled {c16 / c32:.2f}")


if __name__ == "__main__":
    main()
