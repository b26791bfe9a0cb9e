"""Fused projections: a model file declares `FUSED` (one weight for q/k/v, one for gate/up); a
checkpoint keeps the parts apart. These two functions convert between the layouts, for the
checkpoint reader and writer and for model files whose checkpoints need more than this.
"""

from __future__ import annotations

import torch


def join_fused(model, state: dict) -> dict:
    """Concatenate a checkpoint's separate projections into the fused ones `model.FUSED` declares.

    >>> class M: FUSED = {"qkv": ("q", "k", "v")}
    >>> sorted(join_fused(M(), {"l.q.w": torch.ones(1), "l.k.w": torch.ones(1), "l.v.w": torch.ones(1)}))
    ['l.qkv.w']
    """
    state = dict(state)
    for fused, parts in getattr(model, "FUSED", {}).items():
        for key in [k for k in state if f".{parts[0]}." in k]:
            names = [key.replace(parts[0], p) for p in parts]
            if all(n in state for n in names):
                state[key.replace(parts[0], fused)] = torch.cat([state.pop(n) for n in names], dim=0)
    return state


def split_fused(model, state: dict) -> dict:
    """Split fused projections back into the checkpoint's names (`model.fused_sizes()` rows each)."""
    fused_map = getattr(model, "FUSED", {})
    if not fused_map:
        return state
    sizes, out = model.fused_sizes(), {}
    for key, value in state.items():
        fused = next((f for f in fused_map if f".{f}." in key), None)
        if fused is None:
            out[key] = value
            continue
        for part, chunk in zip(fused_map[fused], value.split(sizes[fused], dim=0)):
            out[key.replace(fused, part)] = chunk.contiguous()
    return out
