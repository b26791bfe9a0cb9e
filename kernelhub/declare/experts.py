"""`Experts`: the expert computation of a mixture-of-experts block, as a declared layer.

The router stays in the model file; `Experts` takes what it produced and returns the
combined output:

    out = experts(hidden_states, top_k_index, top_k_weights)   # [T, H], [T, K] int64, [T, K] -> [T, H]

Every experts kernel reads one weight layout (transformers 5.x's in-memory Qwen3-MoE one):

    gate_up_proj       [E, 2I, H]   rows 0..I-1 the gate projection, rows I..2I-1 the up projection
    down_proj          [E, H, I]
    gate_up_proj_bias  [E, 2I]      (bias=True only; same gate-then-up order; else None)
    down_proj_bias     [E, H]       (bias=True only; else None)

`activation="silu"` computes `silu(gate) * up`; `"swiglu_clamped"` is gpt-oss's
`(up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g)` with `g = gate.clamp(max=limit)`.
A kernel declares what it can do beyond plain silu experts (`supports = ("bias",
"swiglu_clamped")`); `kernel_requirements()` says what an instance needs.

Checkpoints come in other layouts; the pure functions below convert whole state dicts
(meta tensors too, so shapes can be checked before anything is read):

    fuse_per_expert / split_per_expert       Qwen3-MoE files: experts.{e}.gate_proj.weight ...
    from_gpt_oss_layout / to_gpt_oss_layout  gpt-oss files: experts.gate_up_proj [E, H, 2I] interleaved

>>> import torch
>>> experts = Experts(num_experts=4, hidden_size=8, intermediate_size=16)
>>> _ = torch.nn.init.normal_(experts.gate_up_proj), torch.nn.init.normal_(experts.down_proj)
>>> x = torch.randn(3, 8)
>>> experts(x, torch.tensor([[0, 2], [2, 3], [1, 0]]), torch.full((3, 2), 0.5)).shape
torch.Size([3, 8])
>>> experts.kernel_requirements(), Experts(4, 8, 16, bias=True, activation="swiglu_clamped").kernel_requirements()
((), ('bias', 'swiglu_clamped'))
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from kernelhub.declare.errors import CheckpointError
from kernelhub.declare.layer import layer
from kernelhub.declare.probe import TOLERANCE, randn, with_weights

ACTIVATIONS = ("silu", "swiglu_clamped")


def expert_activation(gate_up: torch.Tensor, activation: str, alpha: float, limit: float) -> torch.Tensor:
    """[S, 2I] gate-then-up projections -> [S, I] activated hidden states.

    >>> expert_activation(torch.tensor([[0.0, 2.0]]), "silu", 1.702, 7.0)
    tensor([[0.]])
    """
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@layer("Experts")
class Experts(torch.nn.Module):
    """E experts of `intermediate_size`, each a gated MLP; forward is the reference loop over experts.

    Attribute names are what kernels read: `gate_up_proj`, `down_proj`, `gate_up_proj_bias`,
    `down_proj_bias` (None without bias), `num_experts`, `hidden_size`, `intermediate_size`,
    `activation`, `alpha`, `limit` (transformers' GptOssExperts names for the last two).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, bias: bool = False,
                 activation: str = "silu", swiglu_alpha: float = 1.702, swiglu_limit: float = 7.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"Experts activation {activation!r} is unknown; valid: {', '.join(ACTIVATIONS)}")
        for name, value in (("num_experts", num_experts), ("hidden_size", hidden_size),
                            ("intermediate_size", intermediate_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Experts {name} must be a positive int, got {value!r}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.activation, self.alpha, self.limit = activation, float(swiglu_alpha), float(swiglu_limit)
        self.gate_up_proj = torch.nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = torch.nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if bias:
            self.gate_up_proj_bias = torch.nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
            self.down_proj_bias = torch.nn.Parameter(torch.empty(num_experts, hidden_size))
        else:
            self.register_parameter("gate_up_proj_bias", None)
            self.register_parameter("down_proj_bias", None)

    tolerance = TOLERANCE

    @classmethod
    def probe(cls, like, dtype, device):
        """Four experts configured like `like` (biases, activation), four tokens routed to two each."""
        module = with_weights(cls(4, 32, 16, bias=like.has_bias, activation=like.activation,
                                  swiglu_alpha=like.alpha, swiglu_limit=like.limit), dtype, device, mean=0.0, std=0.2)
        index = torch.tensor([[0, 2], [2, 3], [1, 0], [3, 1]], device=device)
        weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]], dtype=dtype, device=device)
        return module, (randn(4, 32, dtype=dtype, device=device), index, weights)

    # Why an instance needs each feature it may ask of a kernel, for binding errors.
    requirement_notes = {"bias": "has expert biases", "swiglu_clamped": "uses the clamped SwiGLU activation (gpt-oss)"}

    @property
    def has_bias(self) -> bool:
        return self.gate_up_proj_bias is not None

    def kernel_requirements(self) -> tuple[str, ...]:
        """Features a kernel must declare in `supports` to serve this instance (plain silu experts need none)."""
        return (("bias",) if self.has_bias else ()) + (("swiglu_clamped",) if self.activation != "silu" else ())

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, bias={self.has_bias}, activation={self.activation!r}")

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()  # ascending: the order transformers adds experts in
        for expert in hit:
            token_idx, slot = torch.where(top_k_index == expert)
            bias = self.gate_up_proj_bias[expert] if self.has_bias else None
            gate_up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert], bias)
            hidden = expert_activation(gate_up, self.activation, self.alpha, self.limit)
            bias = self.down_proj_bias[expert] if self.has_bias else None
            y = F.linear(hidden, self.down_proj[expert], bias) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


# --- checkpoint layouts -----------------------------------------------------------------------------------------

_PER_EXPERT = re.compile(r"^(?P<prefix>(?:.*\.)?experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def fuse_per_expert(state: dict) -> dict:
    """Per-expert checkpoint tensors (Qwen3-MoE files) -> the fused `Experts` layout.

    `...experts.{e}.gate_proj.weight` [I, H] and `up_proj.weight` [I, H] become
    `...experts.gate_up_proj` [E, 2I, H]; `down_proj.weight` [H, I] become `...experts.down_proj`
    [E, H, I]. Other tensors pass through; a prefix with a missing expert or projection is an error.

    >>> w = {f"mlp.experts.{e}.{p}.weight": torch.zeros(2, 3) for e in range(2) for p in ("gate_proj", "up_proj")}
    >>> w |= {f"mlp.experts.{e}.down_proj.weight": torch.zeros(3, 2) for e in range(2)}
    >>> {k: tuple(v.shape) for k, v in fuse_per_expert(w).items()}
    {'mlp.experts.gate_up_proj': (2, 4, 3), 'mlp.experts.down_proj': (2, 3, 2)}
    """
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, value in state.items():
        match = _PER_EXPERT.match(key)
        if match is None:
            out[key] = value
            continue
        groups.setdefault(match["prefix"], {}).setdefault(int(match["e"]), {})[match["proj"]] = value
    for prefix, experts in groups.items():
        count = max(experts) + 1
        for e in range(count):
            lacking = [p for p in ("gate_proj", "up_proj", "down_proj") if p not in experts.get(e, {})]
            if lacking:
                names = ", ".join(f"{prefix}.{e}.{p}.weight" for p in lacking)
                raise CheckpointError(f"{prefix}: expert {e} lacks {names} (experts 0..{count - 1} are present)")
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], dim=0) for e in range(count)])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in range(count)])
    return out


def split_per_expert(state: dict) -> dict:
    """The fused `Experts` layout -> per-expert tensors, inverse of `fuse_per_expert`.

    >>> fused = {"mlp.experts.gate_up_proj": torch.zeros(2, 4, 3), "mlp.experts.down_proj": torch.zeros(2, 3, 2)}
    >>> s = split_per_expert(fused)
    >>> sorted(s)[:3], tuple(s["mlp.experts.1.up_proj.weight"].shape)
    (['mlp.experts.0.down_proj.weight', 'mlp.experts.0.gate_proj.weight', 'mlp.experts.0.up_proj.weight'], (2, 3))
    """
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        if not prefix.endswith("experts") or name not in ("gate_up_proj", "down_proj"):
            out[key] = value
            continue
        for e in range(value.shape[0]):
            if name == "down_proj":
                out[f"{prefix}.{e}.down_proj.weight"] = value[e].contiguous()
            else:
                gate, up = value[e].chunk(2, dim=0)
                out[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
    return out


def _deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[..., g0, u0, g1, u1, ...] -> [..., g0, g1, ..., u0, u1, ...] along `dim`."""
    idx = torch.arange(t.shape[dim], device="cpu")
    order = torch.cat([idx[0::2], idx[1::2]]).to(t.device)
    return t.index_select(dim, order)


def _interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `_deinterleave`."""
    n = t.shape[dim]
    order = torch.arange(n, device="cpu").view(2, n // 2).t().reshape(-1).to(t.device)
    return t.index_select(dim, order)


def _gpt_oss_key(key: str) -> str | None:
    prefix, _, name = key.rpartition(".")
    if prefix == "experts" or prefix.endswith(".experts"):
        if name in ("gate_up_proj", "gate_up_proj_bias", "down_proj"):
            return name
    return None


def from_gpt_oss_layout(state: dict) -> dict:
    """gpt-oss checkpoint experts -> the `Experts` layout (names unchanged, tensors re-laid).

    The file holds `experts.gate_up_proj` [E, H, 2I] with gate and up interleaved on the last
    dim (gate = [..., ::2], up = [..., 1::2]), `gate_up_proj_bias` [E, 2I] interleaved,
    `down_proj` [E, I, H]; `down_proj_bias` [E, H] is already ours.

    >>> s = from_gpt_oss_layout({"experts.gate_up_proj_bias": torch.tensor([[1, 10, 2, 20]])})
    >>> s["experts.gate_up_proj_bias"].tolist()
    [[1, 2, 10, 20]]
    """
    out = {}
    for key, value in state.items():
        name = _gpt_oss_key(key)
        if name == "gate_up_proj":
            value = _deinterleave(value.transpose(1, 2), 1).contiguous()
        elif name == "gate_up_proj_bias":
            value = _deinterleave(value, 1).contiguous()
        elif name == "down_proj":
            value = value.transpose(1, 2).contiguous()
        out[key] = value
    return out


def to_gpt_oss_layout(state: dict) -> dict:
    """The `Experts` layout -> gpt-oss's file layout, inverse of `from_gpt_oss_layout`.

    >>> to_gpt_oss_layout({"experts.gate_up_proj_bias": torch.tensor([[1, 2, 10, 20]])})["experts.gate_up_proj_bias"]
    tensor([[ 1, 10,  2, 20]])
    """
    out = {}
    for key, value in state.items():
        name = _gpt_oss_key(key)
        if name == "gate_up_proj":
            value = _interleave(value, 1).transpose(1, 2).contiguous()
        elif name == "gate_up_proj_bias":
            value = _interleave(value, 1).contiguous()
        elif name == "down_proj":
            value = value.transpose(1, 2).contiguous()
        out[key] = value
    return out
