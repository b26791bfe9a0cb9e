"""Rotary kernel: one program per (batch, head, position) row, for q and k alike.

The Triton path is a `torch.library` custom op with a fake implementation (forward only:
no autograd), so a model using it compiles whole and exports. The op namespace is
`rotary_<hash of this file>`: two versions of the kernel never share an op, and the same
file imported twice (under two module names) registers once.
"""

import hashlib
import inspect
import os
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path below serves
    triton = None


def uses_triton(x: torch.Tensor) -> bool:
    """Triton on GPUs, and on CPU under the Triton interpreter; the reference otherwise."""
    if triton is None:
        return False
    return x.device.type in ("cuda", "xpu") or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_apply_rotary(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


if triton is not None:

    @triton.jit
    def _rotate(X, COS, SIN, Y, heads, seq, sxb, sxh, sxs, scb, scs, HALF: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        b, h, s = pid // (heads * seq), (pid // seq) % heads, pid % seq
        cols = tl.arange(0, HALF)
        x_row, c_row = X + b * sxb + h * sxh + s * sxs, b * scb + s * scs
        x1 = tl.load(x_row + cols).to(tl.float32)
        x2 = tl.load(x_row + HALF + cols).to(tl.float32)
        c1, c2 = tl.load(COS + c_row + cols).to(tl.float32), tl.load(COS + c_row + HALF + cols).to(tl.float32)
        s1, s2 = tl.load(SIN + c_row + cols).to(tl.float32), tl.load(SIN + c_row + HALF + cols).to(tl.float32)
        dtype = Y.dtype.element_ty
        # Round each product to the input dtype, then the sum, exactly as the reference does.
        y1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
        y2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        out = Y + pid * 2 * HALF
        tl.store(out + cols, y1)
        tl.store(out + HALF + cols, y2)

    def _apply(x, cos, sin):
        b, h, s, d = x.shape
        y = torch.empty((b, h, s, d), dtype=x.dtype, device=x.device)
        cos, sin = cos.expand(b, s, d), sin.expand(b, s, d)
        if cos.stride() != sin.stride() or cos.stride(-1) != 1:
            cos, sin = cos.contiguous(), sin.contiguous()
        _rotate[(b * h * s,)](x, cos, sin, y, h, s, x.stride(0), x.stride(1), x.stride(2),
                              cos.stride(0), cos.stride(1), HALF=d // 2)
        return y


NAMESPACE = "rotary_" + hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:16]


def _register():
    """Define the op once per namespace (a second import of the same bytes finds it)."""
    if hasattr(getattr(torch.ops, NAMESPACE), "forward"):
        return

    @torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
    def forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, H, S, D] (unit stride in D) rotated by cos/sin [B or 1, S, D]; contiguous output."""
        return _apply(x, cos, sin)

    @forward.register_fake
    def _(x, cos, sin):
        return x.new_empty(x.shape)


if triton is not None:
    _register()


def apply_rotary(q, k, cos, sin):
    """(q, k) rotated by cos/sin: q [B, H, S, D], k [B, H_kv, S, D], cos/sin [B, S, D]."""
    d = q.shape[-1]
    if not uses_triton(q) or q.stride(-1) != 1 or k.stride(-1) != 1 or d & (d - 1):
        return reference_apply_rotary(q, k, cos, sin)  # the kernel wants a power-of-two head_dim, unit stride
    op = getattr(torch.ops, NAMESPACE).forward
    return op(q, cos, sin), op(k, cos, sin)
