"""Tensor parallelism: per-rank memory and decode speed at TP 1 and TP 2.

    .venv/bin/python bench/tp.py            # a ~100M-parameter random Llama
    .venv/bin/python bench/tp.py --tiny     # a smoke run (seconds)

Writes a random Llama-shaped checkpoint, then loads it in one process (TP 1) and in two
ranks (TP 2: gloo on CPU; NCCL with one GPU per rank when there are two GPUs) with
`tp_plan="auto"`, and reports per rank: parameter bytes (from the local shards), peak
memory (GPU: max allocated; CPU: growth of the peak resident set over loading and
generating), and greedy decode tokens/s at batch 1. On a CPU with few cores two ranks
share the same cores, so TP 2 is not expected to be faster there; it shows the memory
split and the cost of the all-reduces.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

SIZES = {
    "default": {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
                "num_attention_heads": 12, "num_key_value_heads": 4},
    "tiny": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}


def rank_main(args) -> None:
    """One rank (or the single process at TP 1): load, generate, print one JSON line."""
    import torch.distributed as dist

    import kernelhub

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= args.world
    device = torch.device("cuda", args.rank) if cuda else torch.device("cpu")
    tp = {}
    if args.world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{args.store}", rank=args.rank,
                                world_size=args.world, timeout=datetime.timedelta(seconds=300))
        tp = {"tp_plan": "auto", "device": device}
    elif cuda:
        tp = {"device": device}
    importlib.import_module("torch.distributed.tensor")  # imported before the baseline: only the model counts

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = kernelhub.from_pretrained(args.path, attn_implementation="sdpa", **tp)
    model.generation_config.eos_token_id = None
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.arange(1, 17)[None] % model.config.vocab_size

    def decode(n):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=n)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    decode(2)  # warm-up
    one, full = min(decode(1) for _ in range(args.repeat)), min(decode(args.new_tokens) for _ in range(args.repeat))
    peak = torch.cuda.max_memory_allocated(device) if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    if args.world > 1:
        dist.destroy_process_group()
    print(json.dumps({"rank": args.rank, "param_bytes": param_bytes, "peak_bytes": peak,
                      "decode_tokens_per_s": (args.new_tokens - 1) / (full - one), "device": str(device)}))


def run(world: int, path: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))}
        procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world), "--path", path,
                                   "--store", f"{tmp}/store", "--new-tokens", str(args.new_tokens),
                                   "--repeat", str(args.repeat)], stdout=subprocess.PIPE, env=env, text=True)
                 for r in range(world)]
        try:
            outs = [p.communicate(timeout=args.timeout)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank of TP {world} failed")
    return [json.loads(out.strip().splitlines()[-1]) for out in outs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model: a smoke run")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        return rank_main(args)
    from kernelhub.testing.samples import write_random_checkpoint

    config = {"model_type": "llama", "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
              **SIZES["tiny" if args.tiny else "default"]}
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(tmp, config)
        results = {world: run(world, tmp, args) for world in (1, 2)}
    params = sum(p["param_bytes"] for p in results[1])
    print(f"random Llama, {params / 2**20:.1f} MiB of float32 parameters; batch 1, {args.new_tokens} new tokens, "
          f"greedy; device {results[1][0]['device']}")
    print(f"{'tp':>3} {'rank':>4} {'param MiB':>10} {'share':>6} {'peak MiB':>9} {'decode tok/s':>13}")
    for world, ranks in results.items():
        for r in ranks:
            print(f"{world:>3} {r['rank']:>4} {r['param_bytes'] / 2**20:>10.1f} {r['param_bytes'] / params:>6.2f} "
                  f"{r['peak_bytes'] / 2**20:>9.1f} {r['decode_tokens_per_s']:>13.1f}")
    speed = results[2][0]["decode_tokens_per_s"] / results[1][0]["decode_tokens_per_s"]
    print(f"decode speed TP 2 / TP 1: {speed:.2f}x")


if __name__ == "__main__":
    main()
