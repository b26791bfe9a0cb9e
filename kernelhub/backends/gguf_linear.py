"""The `gguf` kernel of the declared `QuantizedLinear` layer: weights kept in packed GGUF blocks (CPU).

A GGUF checkpoint (packed by default, on the CPU) keeps each quantised Linear's weight as the
file stores it: `qweight`, a uint8 `[out_features, bytes_per_row]` tensor of ggml blocks, and
`ggml_type` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K). This kernel multiplies by those
blocks directly through `kernelhub::gguf_mul_mat` (`gguf_quant.py`): decode-sized inputs (1 to 8
rows) in the AVX2 kernel, which reads each packed row once, at close to memory speed; prefill a
tile of unpacked rows at a time. The weight is never unpacked whole, so the model keeps the
file's size in memory (a Q4_K 7B model: about 4 GB instead of 28 in float32).

Results equal unpacking the weight to float32 and multiplying (`F.linear(x.float(), W)`, rounded
once to `x`'s dtype) to float32 rounding: conformance compares against exactly that.
"""

from __future__ import annotations

import torch

from kernelhub.backends.gguf_quant import mul_mat_eager


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
        # Graphs record the op (opaque, with a fake: no graph break); eager calls skip its dispatch
        # unless autograd records, where the op says clearly that it has no backward.
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                x.requires_grad or (bias is not None and bias.requires_grad))):
            return torch.ops.kernelhub.gguf_mul_mat(self.qweight, x, self.ggml_type, self.out_features, bias)
        return mul_mat_eager(self.qweight, x, self.ggml_type, self.out_features, bias)
