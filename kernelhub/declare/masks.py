"""Mask functions in flex attention's `mask_mod` form.

A mask function answers "may query `q_idx` see key `kv_idx`?" for absolute positions:
`mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool tensor`. They are written with
tensor operations only, so the same function works broadcast over a whole grid (bool
and additive masks), under `vmap` (flex's BlockMask) and under `torch.compile`.

>>> import torch
>>> m = and_masks(causal_mask, sliding_window_mask(2))
>>> q, kv = torch.arange(4)[:, None], torch.arange(4)[None, :]
>>> m(0, 0, q, kv).int().tolist()
[[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Index = torch.Tensor | int
"""A position or batch/head index: an int, or a tensor of them (broadcast over a grid)."""
MaskMod = Callable[[Index, Index, Index, Index], torch.Tensor]
"""`mask_mod(batch_idx, head_idx, q_idx, kv_idx) -> bool tensor`: may query `q_idx` see key `kv_idx`?"""


def causal_mask(batch_idx: Index, head_idx: Index, q_idx: Index, kv_idx: Index) -> torch.Tensor:
    """A query sees itself and every earlier key."""
    return kv_idx <= q_idx


def bidirectional_mask(batch_idx: Index, head_idx: Index, q_idx: Index, kv_idx: Index) -> torch.Tensor:
    """Every query sees every key (encoders)."""
    return (q_idx >= 0) & (kv_idx >= 0)


def sliding_window_mask(window: int) -> MaskMod:
    """Keys at most `window - 1` positions back (the transformers convention); add causal on top."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding window must be a positive int, got {window!r}")

    def sliding(batch_idx: Index, head_idx: Index, q_idx: Index, kv_idx: Index) -> torch.Tensor:
        return kv_idx > q_idx - window

    return sliding


def chunked_mask(chunk_size: int) -> MaskMod:
    """Queries see only keys of their own fixed-size chunk; add causal on top."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk size must be a positive int, got {chunk_size!r}")

    def chunked(batch_idx: Index, head_idx: Index, q_idx: Index, kv_idx: Index) -> torch.Tensor:
        return kv_idx // chunk_size == q_idx // chunk_size

    return chunked


def padding_mask(valid: torch.Tensor) -> MaskMod:
    """Keys whose position is marked valid (True or nonzero) in the [batch, positions] tensor `valid`."""
    if valid.dtype == torch.bool:
        def padding(batch_idx: Index, head_idx: Index, q_idx: Index, kv_idx: Index) -> torch.Tensor:
            return valid[batch_idx, kv_idx]
    else:
        def padding(batch_idx: Index, head_idx: Index, q_idx: Index, kv_idx: Index) -> torch.Tensor:
            return valid[batch_idx, kv_idx] != 0

    return padding


def and_masks(*mods: MaskMod) -> MaskMod:
    """A mask that allows a pair only when every one of `mods` allows it."""
    if not mods:
        raise ValueError("and_masks needs at least one mask function")

    def combined(batch_idx: Index, head_idx: Index, q_idx: Index, kv_idx: Index) -> torch.Tensor:
        out = mods[0](batch_idx, head_idx, q_idx, kv_idx)
        for mod in mods[1:]:
            out = out & mod(batch_idx, head_idx, q_idx, kv_idx)
        return out

    return combined


def or_masks(*mods: MaskMod) -> MaskMod:
    """A mask that allows a pair when any one of `mods` allows it."""
    if not mods:
        raise ValueError("or_masks needs at least one mask function")

    def combined(batch_idx: Index, head_idx: Index, q_idx: Index, kv_idx: Index) -> torch.Tensor:
        out = mods[0](batch_idx, head_idx, q_idx, kv_idx)
        for mod in mods[1:]:
            out = out | mod(batch_idx, head_idx, q_idx, kv_idx)
        return out

    return combined
