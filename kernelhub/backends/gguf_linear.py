"""The `gguf` kernel of the declared `QuantizedLinear` layer: weights kept in packed GGUF blocks (CPU).

A GGUF checkpoint (packed by default, on the CPU) keeps each quantised Linear's weight as the file
stores it: `qweight`, a uint8 `[out_features, bytes_per_row]` tensor of ggml blocks, and `ggml_type`
(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K). This kernel multiplies by those blocks directly
(`gguf_quant.py`): decode-sized inputs (1 to 8 rows) through `kernelhub::gguf_rows`, the C++
operator over the C kernel (AVX-512 or AVX2), which reads each packed row once; prefill through
`kernelhub::gguf_mul_mat`: up to 32 rows (a short prompt) in passes of 8 of the same kernel, longer
ones a tile of unpacked rows at a time into a GEMM. The weight is never unpacked whole, so
the model keeps the file's size in memory (a Q4_K 7B model: about 4 GB instead of 28 in float32).

Results equal unpacking the weight to float32 and multiplying (`F.linear(x.float(), W)`, rounded
once to `x`'s dtype) to float32 rounding: conformance compares against exactly that.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from kernelhub.backends.gguf_quant import MAX_GEMV_ROWS, mul_mat_eager, rows_op_available


class GgufLinear(torch.nn.Module):
    """forward(self, x) for a host Linear holding packed GGUF blocks: `qweight` (uint8
    `[out_features, bytes_per_row]`), `ggml_type` (int), `in_features`, `out_features` and an
    optional `bias`. `x` is `[..., in_features]` float32 or bfloat16; the result is
    `[..., out_features]` in `x`'s dtype."""

    has_backward = False  # the weight is not a float parameter; nothing here has a gradient
    can_torch_compile = True
    devices = ("cpu",)
    dtypes = (torch.float32, torch.bfloat16)

    def forward(self, x):
        bias = getattr(self, "bias", None)
        if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
            # the Python op says clearly that it has no backward
            return torch.ops.kernelhub.gguf_mul_mat(self.qweight, x, self.ggml_type, self.out_features, bias)
        if _decode_sized(x, bias) and self.qweight.is_contiguous() and rows_op_available():
            # the C++ operator: a few microseconds a call, from eager code and from graphs alike
            return torch.ops.kernelhub.gguf_rows(self.qweight, x.contiguous(), self.ggml_type, self.out_features,
                                                 None if bias is None else bias.contiguous())
        # Graphs record the Python op (opaque, with a fake: no graph break); eager calls skip its dispatch.
        if torch.compiler.is_compiling():
            return torch.ops.kernelhub.gguf_mul_mat(self.qweight, x, self.ggml_type, self.out_features, bias)
        return mul_mat_eager(self.qweight, x, self.ggml_type, self.out_features, bias)


def _decode_sized(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `kernelhub::gguf_rows` takes `x` (and `bias`): 1 to 8 rows of a known count (a graph
    whose row count varies, continuous batching's, records the Python op), on the CPU, float32 or
    bfloat16."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if torch.compiler.is_compiling():  # a symbolic count is not known to fit: no guard on it
        fits = statically_known_true(rows >= 1) and statically_known_true(rows <= MAX_GEMV_ROWS)
    else:
        fits = 1 <= rows <= MAX_GEMV_ROWS
    return (fits and x.is_cpu and x.dtype in GgufLinear.dtypes
            and (bias is None or (bias.is_cpu and bias.dtype in GgufLinear.dtypes)))
