"""How fast one-row Linear products stream their weights on this CPU: the decode-step matrices
of SmolLM2-135M (30 layers of qkv, o, gate_up and down projections plus the 49,152-row output
projection; 538 MB in float32), multiplied by one row each, through each way kernelhub can run
them, against the machine's copy bandwidth.

    .venv/bin/python bench/gemv.py

Ways: `F.linear` (the reference Linear), oneDNN's packed weights (the `onednn` kernel), and the
`gemv` kernel's `row_linear` compiled by inductor (what a compiled decode step at batch 1 runs),
all in one call over the 121 matrices. Random weights of the real shapes; the fastest of 7 runs.
Read as GB/s of weight bytes: the closer to the copy bandwidth, the closer to the limit.
"""

from __future__ import annotations

import time

import torch
from compile import copy_bandwidth  # bench/compile.py: the same measurement, read + write

from kernelhub.backends.gemv_linear import row_linear
from kernelhub.backends.onednn_linear import bf16_supported, onednn_available, pack

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def fastest(fn, repeat=7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def rates(dtype) -> dict[str, float]:
    """GB/s of weight bytes for each way of running the one-row products in `dtype`."""
    torch.manual_seed(0)
    weights = [torch.randn(*shape, dtype=dtype) * 0.02 for shape in SHAPES]
    rows = {k: torch.randn(1, k, dtype=dtype) for k in (576, 1536)}
    nbytes = sum(w.nbytes for w in weights)
    ways = {"F.linear": lambda: [torch.nn.functional.linear(rows[w.shape[1]], w) for w in weights]}
    if onednn_available() and (dtype == torch.float32 or bf16_supported()):
        packed = [pack(w) for w in weights]  # as the onednn kernel packs them
        ways["oneDNN packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(rows[w.shape[1]], p, None, "none", [], "")
                                         for w, p in zip(weights, packed)]
    compiled = torch.compile(lambda: [row_linear(rows[w.shape[1]], w, None) for w in weights], dynamic=False)
    ways["gemv (inductor)"] = compiled
    return {name: nbytes / fastest(fn) / 1e9 for name, fn in ways.items()}


def main():
    print(f"{torch.get_num_threads()} threads, copy bandwidth {copy_bandwidth() / 1e9:.1f} GB/s\n")
    print(f"{'dtype':10s} {'way':16s} {'GB/s':>6s}")
    for dtype in (torch.float32, torch.bfloat16):
        for name, rate in rates(dtype).items():
            print(f"{str(dtype).removeprefix('torch.'):10s} {name:16s} {rate:6.1f}")


if __name__ == "__main__":
    main()
