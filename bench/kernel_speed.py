"""Hub kernel speed vs the PyTorch eager expression each one replaces, per kernel.

    .venv/bin/python bench/kernel_speed.py [--device cuda]      # or: make bench

Times each kernel's public function against torch eager on the same tensors (median of
interleaved runs, one run) and prints the speedup, the effective memory bandwidth (bytes read
+ written / time) and that bandwidth as a share of a plain device copy measured in the same run
(the practical limit: on a GPU, the HBM bandwidth a copy reaches). `--hidden 4096 8192` runs
each width. On a CPU without a GPU the kernels run their PyTorch reference path (Triton needs a
GPU, or the far slower interpreter), so expect ~1.0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from compile import copy_bandwidth  # bench/compile.py: the same measurement, read + write

HUB_KERNELS = Path(__file__).resolve().parents[1] / "hub_kernels"
for name in ("rmsnorm", "silu-and-mul", "layernorm", "rotary", "flash-attention"):
    sys.path.insert(0, str(HUB_KERNELS / name / "torch-ext"))


def timed(fn, device, repeat):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync()
    return (time.perf_counter() - start) / repeat


def compare(kernel, eager, device, repeat=50, rounds=5):
    a, b = [], []
    for _ in range(rounds):
        a.append(timed(kernel, device, repeat))
        b.append(timed(eager, device, repeat))
    return statistics.median(a), statistics.median(b)


def workloads(device, dtype, hidden):
    import flash_attention
    import layernorm
    import rmsnorm
    import rotary
    import silu_and_mul

    rows = 4096 if device == "cuda" else 256
    x = torch.randn(rows, hidden, device=device, dtype=dtype)
    w, bias = torch.rand(hidden, device=device, dtype=dtype) + 0.5, torch.randn(hidden, device=device, dtype=dtype)
    gate = torch.randn(rows, 2 * hidden, device=device, dtype=dtype)
    q = torch.randn(8, rows // 8, 32, 128, device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(8, rows // 8, 8, 128, device=device, dtype=dtype).transpose(1, 2)
    cos = torch.randn(8, rows // 8, 128, device=device, dtype=dtype)
    sin = torch.randn(8, rows // 8, 128, device=device, dtype=dtype)
    qf, kf = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # [B, S, H, D], flash-attn's layout
    return {
        "rmsnorm": (lambda: rmsnorm.rms_norm(x, w, 1e-6), lambda: rmsnorm.reference_rms_norm(x, w, 1e-6),
                    2 * x.numel() * x.element_size()),
        "silu-and-mul": (lambda: silu_and_mul.silu_and_mul(gate), lambda: silu_and_mul.reference_silu_and_mul(gate),
                         1.5 * gate.numel() * gate.element_size()),
        "layernorm": (lambda: layernorm.layer_norm(x, w, bias, 1e-5),
                      lambda: layernorm.reference_layer_norm(x, w, bias, 1e-5), 2 * x.numel() * x.element_size()),
        "rotary": (lambda: rotary.apply_rotary(q, k, cos, sin), lambda: rotary.reference_apply_rotary(q, k, cos, sin),
                   2 * (q.numel() + k.numel()) * q.element_size()),
        # causal GQA attention against torch's sdpa (the eager column is sdpa here)
        "flash-attention": (lambda: flash_attention.flash_attn_func(qf, kf, kf, causal=True),
                            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True,
                                                                                     enable_gqa=True),
                            (2 * q.numel() + 2 * k.numel()) * q.element_size()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096])
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    os.environ.pop("TRITON_INTERPRET", None)
    limit = copy_bandwidth(args.device, mib=1024 if args.device == "cuda" else 512)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {args.device} ({name}), {str(dtype).removeprefix('torch.')}, copy bandwidth {limit / 1e9:.1f} GB/s")
    for hidden in args.hidden:
        print(f"\nhidden {hidden}")
        print(f"{'kernel':16s} {'kernel ms':>10s} {'eager ms':>10s} {'speedup':>8s} {'GB/s':>8s} {'% of copy':>10s}")
        for name, (kernel, eager, nbytes) in workloads(args.device, dtype, hidden).items():
            t_kernel, t_eager = compare(kernel, eager, args.device)
            bandwidth = nbytes / t_kernel
            share = "-" if name == "flash-attention" else f"{100 * bandwidth / limit:.0f}%"  # bound by compute
            print(f"{name:16s} {t_kernel * 1e3:10.3f} {t_eager * 1e3:10.3f} {t_eager / t_kernel:8.2f} "
                  f"{bandwidth / 1e9:8.1f} {share:>10s}")


if __name__ == "__main__":
    main()
