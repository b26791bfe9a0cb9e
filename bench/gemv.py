"""How fast decode-step Linear products stream their weights on this CPU: the matrices of
SmolLM2-135M (30 layers of qkv, o, gate_up and down projections plus the 49,152-row output
projection; 538 MB in float32), multiplied by 1 row (batch-1 decode) and by 8 rows (batch-8
decode) each, through each way kernelhub can run them, against the machine's copy bandwidth.

    .venv/bin/python bench/gemv.py

Ways: `F.linear` (the reference Linear), oneDNN's packed weights (the `onednn` kernel), the
`gemv` kernel's `few_rows_linear` compiled by inductor (what a compiled one-row decode step
runs), and the AVX2 `skinny_linear` kernel called as eager decode calls it (the `gemv` kernel
runs it for several rows in a graph too, through the op), all in one call over the 121
matrices. Random weights of the real shapes; the fastest of 7 runs. Read as GB/s of weight
bytes: at 1 row, the closer to the copy bandwidth, the closer to the limit; at 8 rows the
products do 8 times the arithmetic per byte.
"""

from __future__ import annotations

import time

import torch
from compile import copy_bandwidth  # bench/compile.py: the same measurement, read + write

from kernelhub.backends.gemv_linear import few_rows_linear
from kernelhub.backends.onednn_linear import bf16_supported, onednn_available, pack
from kernelhub.backends.skinny_linear import skinny_available, skinny_linear_eager

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def fastest(fn, repeat=7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def rates(dtype, m) -> dict[str, float]:
    """GB/s of weight bytes for each way of running the products of `m` rows in `dtype`."""
    torch.manual_seed(0)
    weights = [torch.randn(*shape, dtype=dtype) * 0.02 for shape in SHAPES]
    rows = {k: torch.randn(m, k, dtype=dtype) for k in (576, 1536)}
    nbytes = sum(w.nbytes for w in weights)
    ways = {"F.linear": lambda: [torch.nn.functional.linear(rows[w.shape[1]], w) for w in weights]}
    if onednn_available() and (dtype == torch.float32 or bf16_supported()):
        packed = [pack(w) for w in weights]  # as the onednn kernel packs them
        ways["oneDNN packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(rows[w.shape[1]], p, None, "none", [], "")
                                         for w, p in zip(weights, packed)]
    compiled = torch.compile(lambda: [few_rows_linear(rows[w.shape[1]], w, None) for w in weights], dynamic=False)
    ways["inductor loop"] = compiled
    if skinny_available():
        # as an eager call runs it (a compiled graph calls the op, which adds its dispatch)
        ways["skinny (AVX2)"] = lambda: [skinny_linear_eager(rows[w.shape[1]], w, None) for w in weights]
    return {name: nbytes / fastest(fn) / 1e9 for name, fn in ways.items()}


def main():
    print(f"{torch.get_num_threads()} threads, copy bandwidth {copy_bandwidth() / 1e9:.1f} GB/s\n")
    print(f"{'dtype':10s} {'rows':>4s} {'way':16s} {'GB/s':>6s}")
    for dtype in (torch.float32, torch.bfloat16):
        for m in (1, 8):
            for name, rate in rates(dtype, m).items():
                print(f"{str(dtype).removeprefix('torch.'):10s} {m:4d} {name:16s} {rate:6.1f}")


if __name__ == "__main__":
    main()
