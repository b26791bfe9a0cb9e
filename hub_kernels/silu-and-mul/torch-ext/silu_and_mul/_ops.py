"""silu-and-mul kernels: a 2-D grid of (row, column block).

The Triton path is a `torch.library` custom op (forward and backward ops, fake
implementations, autograd), so a model using it compiles whole and exports. The op
namespace is `silu_and_mul_<hash of this file>`: two versions of the kernel never share an
op, and the same file imported twice (under two module names) registers once.
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


NAMESPACE = "silu_and_mul_" + hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:16]


def _register():
    """Define the ops once per namespace (a second import of the same bytes finds them)."""
    if hasattr(getattr(torch.ops, NAMESPACE), "forward"):
        return

    @torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
    def forward(x2: torch.Tensor) -> torch.Tensor:
        """silu(a) * b for rows x2 = [a | b] of shape [R, 2d]."""
        x2, d = x2.contiguous(), x2.shape[-1] // 2
        y = torch.empty(x2.shape[0], d, dtype=x2.dtype, device=x2.device)
        _forward[(x2.shape[0], triton.cdiv(d, BLOCK))](x2, y, d, BLOCK=BLOCK)
        return y

    @forward.register_fake
    def _(x2):
        return x2.new_empty(x2.shape[0], x2.shape[-1] // 2)

    @torch.library.custom_op(f"{NAMESPACE}::backward", mutates_args=())
    def backward(dy2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """The gradient of `forward` with respect to x2."""
        x2, d = x2.contiguous(), x2.shape[-1] // 2
        dx = torch.empty_like(x2)
        _backward[(x2.shape[0], triton.cdiv(d, BLOCK))](dy2.contiguous(), x2, dx, d, BLOCK=BLOCK)
        return dx

    @backward.register_fake
    def _(dy2, x2):
        return torch.empty_like(x2)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def grad(ctx, dy):
        return backward(dy, ctx.saved_tensors[0])

    forward.register_autograd(grad, setup_context=setup_context)


if triton is not None:
    _register()


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for d = x.shape[-1] // 2."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension, got {x.shape[-1]}")
    if uses_triton(x):
        y = getattr(torch.ops, NAMESPACE).forward(x.reshape(-1, x.shape[-1]))
        return y.view(*x.shape[:-1], x.shape[-1] // 2)
    return reference_silu_and_mul(x)
