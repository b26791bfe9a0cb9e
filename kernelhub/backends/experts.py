"""Built-in layer kernels for `Experts`: eager, grouped_mm and batched_mm (transformers' names).

Each reads the host `Experts` module's fused weights (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I], optional biases) and returns what the reference loop returns:

- `eager`: the reference loop itself (the layer's own forward), under transformers' name.
- `grouped_mm`: tokens sorted by expert, one `torch._grouped_mm` per projection over all
  experts at once (offsets delimit each expert's rows). Best for prefill and large batches.
  On CPU with few (token, slot) pairs (decode), it runs only the experts hit, directly on
  views of their weights (`few_rows_experts`): CPU `_grouped_mm` is itself one `mm` per
  expert, empty ones included, after a sort and a gather that cost more than the math.
- `batched_mm`: every (token, slot) pair gathers its expert's weights and one `bmm` runs
  them all. Reads E*K weight copies, so it suits decode (few tokens), not long prefills.

    model = kernelhub.from_pretrained(path, kernels={"Experts": "grouped_mm"})
    model = kernelhub.from_pretrained(path, experts_implementation="grouped_mm")   # the same plan

>>> import torch
>>> from kernelhub.declare.experts import Experts
>>> experts = Experts(4, 16, 8, bias=True)
>>> for p in experts.parameters():
...     _ = torch.nn.init.normal_(p)
>>> x, idx, w = torch.randn(5, 16), torch.tensor([[0, 1], [1, 3], [3, 0], [0, 1], [2, 0]]), torch.rand(5, 2)
>>> want = experts(x, idx, w)
>>> bool(torch.allclose(GroupedMMExperts.forward(experts, x, idx, w), want, atol=1e-4))
True
>>> bool(torch.allclose(BatchedMMExperts.forward(experts, x, idx, w), want, atol=1e-4))
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernelhub.backends.onednn_linear import ONEDNN_DTYPES
from kernelhub.declare.experts import Experts, expert_activation

SUPPORTS = ("bias", "swiglu_clamped")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def route(top_k_index: torch.Tensor, num_experts: int):
    """(order, expert of each sorted row, int32 end offsets per expert) for the flattened [T*K] slots.

    Counting by scatter-add keeps every shape static (no bincount), so the routing compiles.

    >>> route(torch.tensor([[2, 0], [0, 1]]), 4)
    (tensor([1, 2, 3, 0]), tensor([0, 0, 1, 2]), tensor([2, 3, 4, 4], dtype=torch.int32))
    """
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    return order, flat[order], counts.cumsum(0).to(torch.int32)


def _grouped_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: CPU any float dtype, CUDA bfloat16; 16-byte strides."""
    if a.device.type == "cuda" and a.dtype != torch.bfloat16:
        return False
    if a.device.type not in ("cpu", "cuda"):
        return False
    return all((s * t.element_size()) % 16 == 0 for t in (a, b) for s in t.stride() if s != 1)


def grouped_linear(a: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `a` (sorted by expert; expert e owns rows offsets[e-1]..offsets[e]) times weight[e].T.

    Shapes torch._grouped_mm cannot take (strides not multiples of 16 bytes, float32 on CUDA)
    run one matmul per expert with rows instead: the same result, slower.
    """
    b = weight.transpose(1, 2)
    if _grouped_mm_fits(a, b):
        return torch._grouped_mm(a, b, offs=offsets)
    out = a.new_empty(a.shape[0], weight.shape[1])
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            out[start:end] = a[start:end] @ b[expert]
        start = end
    return out


# At most this many (token, slot) pairs take the one-row-per-pair path on CPU: decode batches (8 tokens at top-8).
FEW_ROWS = 64


def _onednn_linear(x, weight, bias):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def one_row_linear_for(like: torch.Tensor, *weights: torch.Tensor):
    """The F.linear to use for one row on CPU: oneDNN's matmul on the plain (contiguous) weights where it
    serves the dtype.

    MKL's matrix-vector product (what F.linear runs for one row) streamed expert weights about
    1.4x slower than oneDNN's on the same unpacked views in our measurements; no copy is made.
    """
    if like.device.type == "cpu" and like.dtype in ONEDNN_DTYPES and all(w.is_contiguous() for w in weights):
        return _onednn_linear
    return F.linear


def few_rows_experts(module, hidden_states, top_k_index, top_k_weights):
    """Each (token, slot) pair as its own row on views of its expert's weights: no sort, gather or masks.

    One row is a matrix-vector product, which runs at memory speed; a 2..8-row GEMM on the same
    weights was far slower with several threads in our measurements, so a shared expert reads
    its weights once per row here. Every gate/up output is activated in one call, and each
    token's K slots are combined by one batched matmul with the routing weights.

    >>> from kernelhub.declare.experts import Experts
    >>> experts = Experts(4, 8, 4)
    >>> _ = torch.nn.init.normal_(experts.gate_up_proj), torch.nn.init.normal_(experts.down_proj)
    >>> x, idx, w = torch.randn(2, 8), torch.tensor([[3, 1], [1, 0]]), torch.rand(2, 2)
    >>> bool(torch.allclose(few_rows_experts(experts, x, idx, w), experts(x, idx, w), atol=1e-5))
    True
    """
    tokens, k = top_k_index.shape
    pairs = list(enumerate(top_k_index.reshape(-1).tolist()))  # (slot, expert); the token is slot // k
    gate_up_bias, down_bias = module.gate_up_proj_bias, module.down_proj_bias
    hidden_states = hidden_states.contiguous()
    linear = one_row_linear_for(hidden_states, module.gate_up_proj, module.down_proj)
    gate_up = torch.cat([linear(hidden_states[slot // k:slot // k + 1], module.gate_up_proj[e],
                                None if gate_up_bias is None else gate_up_bias[e]) for slot, e in pairs])
    hidden = expert_activation(gate_up, module.activation, module.alpha, module.limit)
    out = torch.cat([linear(hidden[slot:slot + 1], module.down_proj[e], None if down_bias is None else down_bias[e])
                     for slot, e in pairs])
    weights = top_k_weights.to(out.dtype).view(tokens, 1, k)
    return torch.bmm(weights, out.view(tokens, k, -1)).view(tokens, -1).to(hidden_states.dtype)


class GroupedMMExperts(torch.nn.Module):
    """forward(hidden_states, top_k_index, top_k_weights) for a host `Experts`, via torch._grouped_mm
    (on CPU with at most FEW_ROWS (token, slot) pairs, via `few_rows_experts`)."""

    supports = SUPPORTS
    dtypes = DTYPES
    has_backward = False  # torch 2.13's CPU _grouped_mm backward fails; bind with mode='training' for another kernel
    can_torch_compile = False  # torch 2.13's fake _grouped_mm accepts bfloat16 only

    def forward(self, hidden_states, top_k_index, top_k_weights):
        tokens, k = top_k_index.shape
        if hidden_states.device.type == "cpu" and 0 < tokens * k <= FEW_ROWS:
            return few_rows_experts(self, hidden_states, top_k_index, top_k_weights)
        order, experts, offsets = route(top_k_index, self.num_experts)
        rows = hidden_states[order // k]
        gate_up = grouped_linear(rows, self.gate_up_proj, offsets)
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias[experts]
        hidden = expert_activation(gate_up, self.activation, self.alpha, self.limit)
        out = grouped_linear(hidden, self.down_proj, offsets)
        if self.down_proj_bias is not None:
            out = out + self.down_proj_bias[experts]
        out = out * top_k_weights.reshape(-1)[order, None]
        unsorted = torch.empty_like(out).index_copy_(0, order, out)  # back to (token, slot) order
        return unsorted.view(tokens, k, hidden_states.shape[-1]).sum(dim=1).to(hidden_states.dtype)


class BatchedMMExperts(torch.nn.Module):
    """forward(hidden_states, top_k_index, top_k_weights) for a host `Experts`: gather weights per slot, bmm."""

    supports = SUPPORTS
    dtypes = DTYPES
    has_backward = True
    can_torch_compile = True

    def forward(self, hidden_states, top_k_index, top_k_weights):
        tokens, k = top_k_index.shape
        experts = top_k_index.reshape(-1)
        rows = hidden_states.repeat_interleave(k, dim=0).unsqueeze(-1)  # [T*K, H, 1]
        gate_up = torch.bmm(self.gate_up_proj[experts], rows).squeeze(-1)
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias[experts]
        hidden = expert_activation(gate_up, self.activation, self.alpha, self.limit)
        out = torch.bmm(self.down_proj[experts], hidden.unsqueeze(-1)).squeeze(-1)
        if self.down_proj_bias is not None:
            out = out + self.down_proj_bias[experts]
        out = out * top_k_weights.reshape(-1, 1)
        return out.view(tokens, k, hidden_states.shape[-1]).sum(dim=1).to(hidden_states.dtype)


class EagerExperts(torch.nn.Module):
    """The reference loop over experts (`Experts.forward`), under transformers' name `eager`."""

    supports = SUPPORTS
    has_backward = True
    can_torch_compile = False  # the loop over the experts hit is data-dependent: no fullgraph compile
    forward = Experts.forward


EXPERTS_KERNELS = {"eager": EagerExperts, "grouped_mm": GroupedMMExperts, "batched_mm": BatchedMMExperts}
