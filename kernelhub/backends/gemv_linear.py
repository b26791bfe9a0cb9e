"""A layer kernel for `Linear` on CPU for decode: 1 to 8 input rows at close to memory speed.

A decode step multiplies one row per sequence by every weight matrix, so its speed is the speed
of reading the weights. Library GEMMs are tuned for many rows: on a 2-core AVX2 CPU `F.linear`
reads float32 weights at about 40% of the copy bandwidth for one row and 6 GB/s for eight, and
bfloat16 far slower. This kernel takes decode-sized inputs another way (`bench/gemv.py`; the
numbers are in `docs/performance.md`):

- **one row inside a compiled graph**: an elementwise multiply and a row sum
  (`few_rows_linear`), which inductor fuses into one vectorised, multi-threaded loop that reads
  each weight once, at about the copy bandwidth;
- **2 to 8 rows, and every eager call of 1 to 8 rows**: `kernelhub::skinny_linear`, a small AVX2
  kernel compiled on first use (`skinny_linear.py`), which multiplies each weight row by every
  input row while it is in a register (inductor's loop is arithmetic-bound there). Where it
  cannot be built (no C compiler, no AVX2), compiled graphs use `few_rows_linear` and eager
  calls fall through to:
- **everything else** (prefill, larger batches): the oneDNN kernel's packed weights where oneDNN
  serves the dtype, else `F.linear`.

    model = kernelhub.from_pretrained(path, kernels={"Linear": ["gemv", "reference"]})
    model.generate(ids, max_new_tokens=64, cache="static", compile=True)   # decode at memory speed

Products are summed in float32 for every dtype (bfloat16 weights are widened as they are read)
and rounded once, so results differ from `F.linear` by float32 rounding only. Memory: where the
oneDNN path runs (a float32 prefill, say) it keeps oneDNN's packed copy of each weight beside the
weight, as the `onednn` kernel does; unbinding frees it.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from kernelhub.backends.onednn_linear import ONEDNN_DTYPES, OneDNNLinear
from kernelhub.backends.skinny_linear import MAX_ROWS, skinny_available, skinny_linear_eager

ROWS_PER_PASS = 8192


def few_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b for an `x` with a few rows, as a multiply and a float32 sum (inductor fuses them into
    one pass over `weight` that multiplies each weight row by every input row while it is in cache;
    run eagerly it would build the whole product, so it is meant for compiled graphs).

    >>> x, w = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    >>> few_rows_linear(x, w, None)
    tensor([[11., 17., 23.]])
    """
    from torch._inductor.inductor_prims import force_stride_order

    # Materialise the input rows first: left to itself inductor inlines their producer (a norm, an
    # activation) into the reduction and recomputes it for every output row.
    rows = force_stride_order(x.reshape(-1, x.shape[-1]), (x.shape[-1], 1)).float()
    # The product is laid out weight row by input row, [N, M], so the loop reads a weight row once
    # and reuses it for every input row (laid out [M, N], 8 rows ran 3x slower: the weight streamed
    # once per row). A very tall weight (an output projection over the vocabulary) streams faster
    # in several passes than in one: measured 27 against 21 GB/s for SmolLM2's 49152 x 576 in float32.
    out = torch.cat([(part.float()[:, None, :] * rows).sum(-1) for part in weight.split(ROWS_PER_PASS)], dim=0)
    if bias is not None:
        out = out + bias.float()[:, None]
    return out.t().to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class GemvLinear(torch.nn.Module):
    """forward(self, x) for a host `nn.Linear` (`weight`, `bias`). For an input of 1 to `MAX_ROWS`
    rows: inside a compiled graph, one row runs as `few_rows_linear` (inductor's loop); more rows,
    and every eager call, run the AVX2 kernel `kernelhub::skinny_linear` (`few_rows_linear` in a
    compiled graph where that kernel cannot be built). Larger inputs run as oneDNN's packed weights
    (see `OneDNNLinear`) where oneDNN serves the dtype, else as `F.linear`."""

    has_backward = False  # neither the C kernel nor the oneDNN path has one
    can_torch_compile = True
    devices = ("cpu",)
    dtypes = (torch.float32, torch.bfloat16)

    def forward(self, x):
        rows = x.numel() // max(x.shape[-1], 1)  # static under compile: each branch is decided once
        if 1 <= rows <= MAX_ROWS:
            # torch.export counts as compiling, but only inductor turns the multiply-reduce into a
            # streaming loop: an exported graph runs as an eager call would.
            compiled = torch.compiler.is_compiling() and not torch.compiler.is_exporting()
            # The C kernel reads a plain tensor's memory (a wrapper such as a DTensor shard has
            # none) in the weight's own dtype; under autocast the reference path decides the dtype.
            skinny = (skinny_available() and not is_traceable_wrapper_subclass(self.weight)
                      and x.dtype == self.weight.dtype and not torch.is_autocast_enabled("cpu"))
            # In a compiled graph one row runs fastest in inductor's own loop, fused with its
            # neighbours (bf16 at batch 1: 23 ms a step, against 32-42 through the op, whose fixed
            # cost per call is large next to ~40 us of work on a small matrix); the op pays off
            # for several rows, where the loop is arithmetic-bound.
            if compiled and (rows == 1 or not skinny):
                return few_rows_linear(x, self.weight, self.bias)
            if skinny:
                # Graphs record the op; eager calls skip its dispatch (10-25 us, ~120 calls a step)
                # unless autograd is recording: through the op, a backward raises a clear error
                # instead of silently producing no gradient.
                if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
                        t is not None and t.requires_grad for t in (x, self.weight, self.bias))):
                    return torch.ops.kernelhub.skinny_linear(x, self.weight, self.bias)
                return skinny_linear_eager(x, self.weight, self.bias)
        # oneDNN packs the weight's dtype: an autocast input of another dtype goes through F.linear,
        # which casts as autocast decides (on CPUs where oneDNN has bf16, x may be bf16, W float32)
        if x.dtype in ONEDNN_DTYPES and x.dtype == self.weight.dtype and not torch.is_autocast_enabled("cpu"):
            return OneDNNLinear.forward(self, x)
        return torch.nn.functional.linear(x, self.weight, self.bias)
