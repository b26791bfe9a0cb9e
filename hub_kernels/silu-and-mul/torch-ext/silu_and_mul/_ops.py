"""silu-and-mul kernels: a 2-D grid of (row, column block)."""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path below serves
    triton = None

BLOCK = 1024


def uses_triton(x: torch.Tensor) -> bool:
    """Triton on GPUs, and on CPU under the Triton interpreter; the reference otherwise."""
    if triton is None:
        return False
    return x.device.type in ("cuda", "xpu") or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def reference_silu_and_mul(x):
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]


if triton is not None:

    @triton.jit
    def _forward(X, Y, d, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < d
        a = tl.load(X + row * 2 * d + cols, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(X + row * 2 * d + d + cols, mask=inside, other=0.0).to(tl.float32)
        silu = (a * tl.sigmoid(a)).to(X.dtype.element_ty).to(tl.float32)  # rounded like the reference
        tl.store(Y + row * d + cols, silu * b, mask=inside)

    @triton.jit
    def _backward(DY, X, DX, d, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < d
        a = tl.load(X + row * 2 * d + cols, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(X + row * 2 * d + d + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * d + cols, mask=inside, other=0.0).to(tl.float32)
        sig = tl.sigmoid(a)
        tl.store(DX + row * 2 * d + cols, dy * b * sig * (1.0 + a * (1.0 - sig)), mask=inside)
        tl.store(DX + row * 2 * d + d + cols, dy * a * sig, mask=inside)

    class _SiLUAndMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            d = x.shape[-1] // 2
            x2 = x.reshape(-1, 2 * d).contiguous()
            y = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
            _forward[(x2.shape[0], triton.cdiv(d, BLOCK))](x2, y, d, BLOCK=BLOCK)
            ctx.save_for_backward(x2)
            ctx.shape = x.shape
            return y.view(*x.shape[:-1], d)

        @staticmethod
        def backward(ctx, dy):
            (x2,) = ctx.saved_tensors
            d = x2.shape[-1] // 2
            dx = torch.empty_like(x2)
            _backward[(x2.shape[0], triton.cdiv(d, BLOCK))](dy.reshape(-1, d).contiguous(), x2, dx, d, BLOCK=BLOCK)
            return dx.view(ctx.shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for d = x.shape[-1] // 2."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    if uses_triton(x):
        return _SiLUAndMul.apply(x)
    return reference_silu_and_mul(x)
