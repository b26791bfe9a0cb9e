"""The eager reference attention: plain matmul, softmax, matmul.

This is the oracle every other backend is tested against. It follows transformers'
eager path (scores in the model dtype, softmax in float32) and returns the weights.
Rows where every key is masked produce zeros, as sdpa and flex do.
"""

import torch


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * groups, S, D] for grouped-query attention."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def eager_attention(module, q, k, v, mask, *, scaling, dropout=0.0, softcap=None):
    """Reference attention. `mask` is a bool tensor broadcastable to [B, H, Q, KV].

    >>> q = k = v = torch.ones(1, 2, 3, 4)
    >>> out, w = eager_attention(None, q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), scaling=0.5)
    >>> tuple(out.shape), tuple(w.shape)
    ((1, 3, 2, 4), (1, 2, 3, 3))
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0).to(q.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2), probs
