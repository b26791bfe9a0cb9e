"""A layer kernel for `Linear` on CPU that streams weights at memory speed in compiled decode.

At batch 1 a decode step multiplies one row by every weight matrix: a matrix-vector product
whose speed is the speed of reading the weight. Neither `F.linear` (about 40% of the machine's
copy bandwidth on a 2-core AVX2 CPU) nor oneDNN's packed GEMV (about two thirds) gets close. Written
as an elementwise multiply and a row sum, the same product lets inductor emit one fused,
vectorised, multi-threaded loop that reads each weight once, at about the copy bandwidth
(`bench/gemv.py`; the numbers are in `docs/performance.md`). That loop exists only inside a
compiled graph, so this kernel takes it there, for an input with a single row; everything else
(eager calls, prefill, batches) runs as the oneDNN kernel does where oneDNN serves the dtype,
else as `F.linear`.

    model = kernelhub.from_pretrained(path, kernels={"Linear": ["gemv", "reference"]})
    model.generate(ids, max_new_tokens=64, cache="static", compile=True)   # decode at memory speed

Products are summed in float32 for every dtype (bfloat16 weights are widened as they are
read), so results differ from `F.linear` by float32 rounding only. Memory: where the oneDNN
path runs (a float32 prefill, say) it keeps oneDNN's packed copy of each weight beside the
weight the compiled decode reads, as the `onednn` kernel does; unbinding frees it.
"""

from __future__ import annotations

import torch

from kernelhub.backends.onednn_linear import ONEDNN_DTYPES, OneDNNLinear


ROWS_PER_PASS = 8192


def row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b for an `x` with one row, as a multiply and a float32 row sum (inductor fuses them
    into one pass over `weight`; run eagerly it would build the whole product, so it is meant for
    compiled graphs).

    >>> x, w = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    >>> row_linear(x, w, None)
    tensor([[11., 17., 23.]])
    """
    from torch._inductor.inductor_prims import force_stride_order

    # Materialise the input row first: left to itself inductor inlines its producer (a norm, an
    # activation) into the reduction and recomputes it for every output row.
    row = force_stride_order(x.reshape(1, -1), (x.shape[-1], 1)).float()
    # A very tall weight (an output projection over the vocabulary) streams faster in several
    # passes than in one: measured 27 against 21 GB/s for SmolLM2's 49152 x 576 in float32.
    out = torch.cat([(part.float() * row).sum(-1) for part in weight.split(ROWS_PER_PASS)], dim=-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class GemvLinear(torch.nn.Module):
    """forward(self, x) for a host `nn.Linear` (`weight`, `bias`): `row_linear` for a one-row input
    inside a compiled graph, oneDNN's packed weights (see `OneDNNLinear`) or `F.linear` otherwise."""

    has_backward = False  # the oneDNN path it shares has none
    can_torch_compile = True
    devices = ("cpu",)
    dtypes = (torch.float32, torch.bfloat16)

    def forward(self, x):
        # Only inductor turns the multiply-reduce into a streaming loop. torch.export also counts
        # as compiling; an exported graph runs as an eager call would (oneDNN or F.linear).
        # The row count is static under compile.
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting() and x.numel() == x.shape[-1]:
            return row_linear(x, self.weight, self.bias)
        if x.dtype in ONEDNN_DTYPES:
            return OneDNNLinear.forward(self, x)
        return torch.nn.functional.linear(x, self.weight, self.bias)
