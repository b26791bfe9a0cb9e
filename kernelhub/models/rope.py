"""Rotary position embeddings (RoPE): the checked RoPE config fields, inverse frequencies
for the default, linear, llama3 and yarn rope types (yarn also scales cos/sin by its
attention factor), cos/sin tables per position, and the rotate-half application.

`cfg` is any config with `rope` (the parsed `rope_parameters`) and `head_dim`.

>>> import types
>>> cfg = types.SimpleNamespace(rope={"rope_type": "default", "rope_theta": 10000.0}, head_dim=4)
>>> rope_inverse_frequencies(cfg).tolist()
[1.0, 0.009999999776482582]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kernelhub.declare.config_schema import boolean, choice, invalid, mapping, positive_float, positive_int

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_parameters(d: dict, source: str) -> dict:
    """The checked RoPE parameters: `rope_parameters` (v5) or `rope_scaling` plus `rope_theta` (v4).

    >>> rope_parameters({"rope_theta": 500000.0}, "config.json")
    {'rope_theta': 500000.0, 'rope_type': 'default'}
    """
    where = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    rope = dict(mapping(d, "rope_parameters", source) or mapping(d, "rope_scaling", source))
    rope["rope_theta"] = positive_float({"rope_theta": d.get("rope_theta", 10000.0), **rope}, "rope_theta", source)
    rope["rope_type"] = choice({"rope_type": rope.get("type", "default"), **rope}, "rope_type", ROPE_TYPES, source)
    inner = f"{source} ({where})"  # the scaling fields live inside that object
    if rope["rope_type"] in ("linear", "llama3"):
        rope["factor"] = positive_float(rope, "factor", inner)
    if rope["rope_type"] == "llama3":
        low, high = (positive_float(rope, k, inner) for k in ("low_freq_factor", "high_freq_factor"))
        if high <= low:
            raise invalid(inner, "high_freq_factor", high, f"a number > low_freq_factor ({low})")
        rope["low_freq_factor"], rope["high_freq_factor"] = low, high
        rope["original_max_position_embeddings"] = positive_int(rope, "original_max_position_embeddings", inner)
    if rope["rope_type"] == "yarn":
        _yarn_parameters(rope, d, inner)
    return rope


def _yarn_parameters(rope: dict, d: dict, inner: str) -> None:
    """Check yarn's fields in place, with transformers' defaults (`original_max_position_embeddings`
    defaults to the config's `max_position_embeddings`; beta_fast 32, beta_slow 1; truncate on)."""
    rope["factor"] = positive_float(rope, "factor", inner)
    rope["original_max_position_embeddings"] = positive_int(
        {"original_max_position_embeddings": d.get("max_position_embeddings"), **rope},
        "original_max_position_embeddings", inner)
    for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        rope[key] = positive_float(rope, key, inner) if rope.get(key) else default  # 0/null: the default
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        if rope.get(key) is not None:
            rope[key] = positive_float(rope, key, inner)
    rope["truncate"] = boolean(rope, "truncate", inner, default=True)


def rope_inverse_frequencies(cfg) -> torch.Tensor:
    """RoPE inverse frequencies for the default, linear, llama3 and yarn rope types."""
    rope, dim = cfg.rope, cfg.head_dim
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope["rope_type"] == "linear":
        inv_freq = inv_freq / rope["factor"]
    elif rope["rope_type"] == "llama3":
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old_len = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif rope["rope_type"] == "yarn":
        inv_freq = _yarn_inverse_frequencies(rope, dim)
    return inv_freq


def _yarn_inverse_frequencies(rope: dict, dim: int) -> torch.Tensor:
    """YaRN: interpolate (divide by `factor`) the low frequencies, keep the high ones, ramp linearly
    between the dimensions that make `beta_slow` and `beta_fast` rotations over the original length."""
    base, factor, old_len = rope["rope_theta"], rope["factor"], rope["original_max_position_embeddings"]

    def correction_dim(rotations):
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope["beta_fast"]), correction_dim(rope["beta_slow"])
    if rope["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def rope_attention_factor(cfg) -> float:
    """What cos and sin are multiplied by: yarn's attention factor (from `factor` and the optional
    `mscale`/`mscale_all_dim` unless given), 1.0 for the other rope types.

    >>> import types
    >>> rope = {"rope_type": "yarn", "factor": 32.0, "rope_theta": 1.0}
    >>> round(rope_attention_factor(types.SimpleNamespace(rope=rope)), 4)
    1.3466
    """
    rope = cfg.rope
    if rope["rope_type"] != "yarn":
        return 1.0
    if rope.get("attention_factor") is not None:
        return rope["attention_factor"]

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = rope["factor"], rope.get("mscale"), rope.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions, in float32 (scaled by the rope type's attention
    factor) then cast to the model dtype."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.attention_factor = rope_attention_factor(cfg)
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def reset_buffers(self):
        """Recompute the buffer after the model was built on the meta device."""
        self.inv_freq = rope_inverse_frequencies(self.cfg).to(self.inv_freq.device)

    def forward(self, position_ids, dtype):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        if self.attention_factor != 1.0:
            return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)
