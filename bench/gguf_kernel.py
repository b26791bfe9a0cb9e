"""How fast the GGUF kernel streams packed weights on this CPU: a decode-step product (1 and 8
input rows) with a 4096 x 4096 matrix and with SmolLM2-sized 576 x 1536 matrices (576 outputs,
1536 inputs: the down projection), for every type `kernelhub.backends.gguf_quant` serves, next
to the machine's copy bandwidth.

    .venv/bin/python bench/gguf_kernel.py

Read as GB/s of packed bytes (what a GGUF file stores for the matrix), and as a share of the
copy bandwidth: a 512 MiB tensor copied into another, counted as its bytes read plus its bytes
written, as bench/compile.py counts it. Each measurement cycles through enough matrices (about
192 MiB of blocks) that they come from memory, not the caches, 7 times, and adds up each matrix's
fastest call; the copy is timed the same way, 16 MiB slice by slice, so work that other processes
run on these cores disturbs both alike (a clone of the whole tensor is printed too). Random blocks
with finite scales; the kernel's speed does not depend on the values.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES

from kernelhub.backends.gguf_quant import (TYPES, gguf_kernel_available, instruction_set, mul_mat_eager,
                                           unavailable_reason)

SHAPES = {"4096x4096": (4096, 4096), "576x1536 (SmolLM2)": (576, 1536)}
TOTAL_BYTES = 192 << 20
ROWS = (1, 8)


def fastest(fn, repeat=7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def fastest_each(calls, repeat=7) -> float:
    """The sum over `calls` of each one's fastest time, running them in turn `repeat` times."""
    best = [float("inf")] * len(calls)
    for _ in range(repeat + 1):  # the first round warms up
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            best[i] = min(best[i], time.perf_counter() - start)
    return sum(best)


def copy_bandwidth(mib: int = 512) -> tuple[float, float]:
    """Bytes per second (read + write) of copying `mib` MiB: a clone of the whole tensor, and the
    tensor copied a 16 MiB slice at a time into its own slice of a second tensor (every slice comes
    from memory and goes to memory: the two tensors are far larger than the caches)."""
    src = torch.rand(mib << 18)  # float32: 4 bytes each
    whole = 2 * src.nbytes / fastest(lambda: src.clone(), repeat=5)
    dst = torch.zeros_like(src)
    slices = [lambda a=a, b=b: b.copy_(a) for a, b in zip(src.split(4 << 20), dst.split(4 << 20))]
    return whole, 2 * src.nbytes / fastest_each(slices)


def random_blocks(ggml_type, out_features: int, in_features: int, rng) -> torch.Tensor:
    """[out_features, bytes_per_row] random blocks whose fp16 scales are small and finite."""
    values, size = GGML_QUANT_SIZES[ggml_type]
    blocks = rng.integers(0, 256, (out_features, in_features // values, size), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, blocks.shape[:2] + (2,)).astype(np.float16).view(np.uint8)
    if ggml_type.name == "Q6_K":
        blocks[..., 208:210] = scales[..., 0:2]
    else:  # d first; then dmin or m, where the type has one (an overwritten qh or nibble is harmless)
        blocks[..., 0:4] = scales
    return torch.from_numpy(blocks.reshape(out_features, -1))


def rate(ggml_type, shape, m, rng) -> float:
    """GB/s of packed bytes for products of `m` rows with matrices of `shape`."""
    out_features, in_features = shape
    one = random_blocks(ggml_type, out_features, in_features, rng)
    weights = [one] + [random_blocks(ggml_type, out_features, in_features, rng)
                       for _ in range(math.ceil(TOTAL_BYTES / one.nbytes) - 1)]
    x = torch.randn(m, in_features)
    seconds = fastest_each([lambda w=w: mul_mat_eager(w, x, int(ggml_type), out_features) for w in weights])
    return sum(w.nbytes for w in weights) / seconds / 1e9


def main():
    if not gguf_kernel_available():
        print(f"the C kernel is unavailable here ({unavailable_reason()}); this measures the torch fallback")
    whole, copy = (rate / 1e9 for rate in copy_bandwidth())
    print(f"{torch.get_num_threads()} threads, the {instruction_set() or 'torch'} build; "
          f"copy bandwidth (read + write) {copy:.1f} GB/s "
          f"(a whole 512 MiB clone: {whole:.1f} GB/s)\n")
    rng = np.random.default_rng(0)
    header = "".join(f"{f'{name}, {m} row' + 's' * (m > 1):>28}" for name in SHAPES for m in ROWS)
    print(f"{'type':<6}{header}")
    for ggml_type in TYPES:
        cells = []
        for shape in SHAPES.values():
            if shape[1] % GGML_QUANT_SIZES[ggml_type][0]:
                cells += ["n/a"] * len(ROWS)
                continue
            for m in ROWS:
                gbs = rate(ggml_type, shape, m, rng)
                cells.append(f"{gbs:5.1f} GB/s ({100 * gbs / copy:3.0f}%)")
        print(f"{ggml_type.name:<6}" + "".join(f"{c:>28}" for c in cells), flush=True)
    # another process on these cores slows both: a copy bandwidth that moved says the run was disturbed
    whole, slices = (rate / 1e9 for rate in copy_bandwidth())
    print(f"\ncopy bandwidth again at the end: {slices:.1f} GB/s (whole: {whole:.1f} GB/s)")


if __name__ == "__main__":
    main()
