"""The `varlen` mask format: packed sequences described by lengths, for flash-style kernels.

Flash kernels take no mask tensor. They take the real tokens of every row packed into one
sequence, `cu_seqlens` (cumulative lengths), and flags (causal, window). This turns the
semantic `AttentionMask` into that form, and refuses masks it cannot express exactly
(custom mask functions, chunked attention, padding with holes) instead of running a
subtly different mask.

>>> import torch
>>> from kernelhub.declare.attention_mask import AttentionMask
>>> m = AttentionMask.build(batch=2, q_len=3, padding=torch.tensor([[1, 1, 1], [0, 1, 1]]))
>>> v = m.materialize("varlen")
>>> v.cu_seqlens_q.tolist(), v.max_seqlen_q, v.causal
([0, 3, 5], 3, True)
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class VarlenMask:
    cu_seqlens_q: torch.Tensor   # int32 [B + 1]
    cu_seqlens_k: torch.Tensor   # int32 [B + 1]
    max_seqlen_q: int
    max_seqlen_k: int
    q_index: torch.Tensor        # rows of the flattened [B * q_len] queries that are real
    k_index: torch.Tensor        # rows of the flattened [B * kv_len] keys that are real
    causal: bool
    window: tuple[int, int]      # flash `window_size`: (left, right), -1 = unlimited


def _contiguous_runs(real: torch.Tensor) -> bool:
    """Every row's True values form one run (left or right padding, not holes)."""
    edges = (real[:, 1:] != real[:, :-1]).sum(dim=1) + real[:, 0].long() + real[:, -1].long()
    return bool((edges <= 2).all())


def varlen_from_mask(mask) -> VarlenMask:
    parts = mask.parts
    if parts is None or parts["custom"] or parts["chunk_size"]:
        what = "a custom mask function" if parts is None or parts["custom"] else "chunked attention"
        raise ValueError(f"the varlen mask format cannot express {what}; bind a backend with "
                         "arbitrary_mask support (sdpa, flex, eager) for this site")
    if isinstance(mask.q_offset, torch.Tensor):
        raise ValueError("the varlen mask format needs the cache position on the host; a compiled step's "
                         "static cache holds it on the device: bind sdpa, flex or eager for compiled decoding")
    b, q_len, kv_len, device = mask.batch, mask.q_len, mask.kv_len, mask.device
    q_end, kv_end = mask.q_offset + q_len, mask.kv_offset + kv_len
    if parts["causal"] and q_end != kv_end:
        raise ValueError(f"varlen causal attention needs the queries to end where the keys end "
                         f"(queries end at {q_end}, keys at {kv_end})")
    padding = parts["padding"]
    if padding is None:
        real_q = torch.ones(b, q_len, dtype=torch.bool, device=device)
        real_k = torch.ones(b, kv_len, dtype=torch.bool, device=device)
    else:
        real_k = padding[:, mask.kv_offset:kv_end].expand(b, kv_len)
        real_q = padding[:, mask.q_offset:q_end].expand(b, q_len)
        if not _contiguous_runs(real_k):
            raise ValueError("the varlen mask format needs each row's real tokens to be contiguous "
                             "(left or right padding); this attention_mask has holes")
    lens_q, lens_k = real_q.sum(dim=1), real_k.sum(dim=1)
    window = parts["sliding_window"]
    return VarlenMask(
        cu_seqlens_q=torch.nn.functional.pad(lens_q.cumsum(0), (1, 0)).to(torch.int32),
        cu_seqlens_k=torch.nn.functional.pad(lens_k.cumsum(0), (1, 0)).to(torch.int32),
        max_seqlen_q=int(lens_q.max()), max_seqlen_k=int(lens_k.max()),
        q_index=real_q.reshape(-1).nonzero().squeeze(1), k_index=real_k.reshape(-1).nonzero().squeeze(1),
        causal=bool(parts["causal"]),
        window=(window - 1, 0 if parts["causal"] else window - 1) if window else (-1, -1))
