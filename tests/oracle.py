"""A dense float64 attention oracle, independent of every backend under test."""

import torch


def dense_attention(q, k, v, allowed, scaling, softcap=None, sinks=None):
    """q [B,H,Q,D], k/v [B,Hkv,KV,D], allowed bool [B|1,1,Q,KV] -> [B,Q,H,D] (fully masked rows -> 0).

    `sinks` [H]: attention-sink logits, one extra softmax column per head that adds no value."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        column = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1]
    else:
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bqhd", probs, v)
