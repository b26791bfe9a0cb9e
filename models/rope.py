"""Rotary position embeddings (RoPE) for the Llama family: the checked RoPE config fields,
inverse frequencies for the default, linear and llama3 rope types, cos/sin tables per
position, and the rotate-half application.

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

from kernelhub.models.config_schema import choice, invalid, mapping, positive_float, positive_int

ROPE_TYPES = ("default", "linear", "llama3")


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
    return rope


def rope_inverse_frequencies(cfg) -> torch.Tensor:
    """RoPE inverse frequencies for the default, linear and llama3 rope types."""
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
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions, in float32 then cast to the model dtype."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def reset_buffers(self):
        """Recompute the buffer after the model was built on the meta device."""
        self.inv_freq = rope_inverse_frequencies(self.cfg).to(self.inv_freq.device)

    def forward(self, position_ids, dtype):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q, k, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
