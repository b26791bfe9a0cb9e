"""RMSNorm kernels. One program per row; statistics in float32."""

import os

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


def reference_rms_norm(x, weight, eps):
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


if triton is not None:

    @triton.jit
    def _forward(X, W, Y, RSTD, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(X + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        tl.store(RSTD + row, rstd)
        # Round the normalised value to the input dtype before the weight, as the reference does.
        x_hat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(Y + row * n_cols + cols, w * x_hat, mask=inside)

    @triton.jit
    def _backward(DY, X, W, RSTD, DX, DW_ROWS, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < n_cols
        x = tl.load(X + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * n_cols + cols, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        w_dy = w * dy
        dx = (w_dy - x_hat * (tl.sum(x_hat * w_dy, axis=0) / n_cols)) * rstd
        tl.store(DX + row * n_cols + cols, dx, mask=inside)
        tl.store(DW_ROWS + row * n_cols + cols, dy * x_hat, mask=inside)

    class _RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            shape, n = x.shape, x.shape[-1]
            x2 = x.reshape(-1, n).contiguous()
            y = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
            rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            block = triton.next_power_of_2(n)
            _forward[(x2.shape[0],)](x2, weight, y, rstd, n, eps, BLOCK=block, num_warps=min(max(block // 256, 1), 16))
            ctx.save_for_backward(x2, weight, rstd)
            ctx.shape = shape
            return y.view(shape)

        @staticmethod
        def backward(ctx, dy):
            x2, weight, rstd = ctx.saved_tensors
            n = x2.shape[-1]
            dy2 = dy.reshape(-1, n).contiguous()
            dx = torch.empty_like(x2)
            dw_rows = torch.empty(x2.shape, dtype=torch.float32, device=x2.device)
            block = triton.next_power_of_2(n)
            _backward[(x2.shape[0],)](dy2, x2, weight, rstd, dx, dw_rows, n, BLOCK=block,
                                      num_warps=min(max(block // 256, 1), 16))
            return dx.view(ctx.shape), dw_rows.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), with float32 statistics."""
    if uses_triton(x):
        return _RMSNorm.apply(x, weight, eps)
    return reference_rms_norm(x, weight, eps)
