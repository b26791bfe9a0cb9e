"""The eager reference attention: plain matmul, softmax, matmul.

This is the oracle every other backend is tested against. It follows transformers'
eager path (scores in the model dtype, softmax in float32) and returns the weights.
Rows where every key is masked produce zeros, as sdpa and flex do.

Attention sinks (gpt-oss): one learned logit per query head joins the softmax denominator
and contributes no value. With sinks the function follows transformers' gpt-oss eager path
exactly: concatenate the sink column, subtract the row max, softmax in the scores' dtype,
drop the sink column. The returned weights exclude the sink column, so a row sums to less
than one; a fully masked row keeps only its sink and gives zeros.
"""

import torch


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * groups, S, D] for grouped-query attention."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _sink_softmax(scores: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """transformers' gpt-oss softmax: the sink logit joins each row's denominator, then is dropped."""
    b, h, q, _ = scores.shape
    column = sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(b, h, q, 1)
    combined = torch.cat([scores, column], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    return torch.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]


def eager_attention(module, q, k, v, mask, *, scaling, dropout=0.0, softcap=None, sinks=None):
    """Reference attention. `mask` is a bool tensor broadcastable to [B, H, Q, KV];
    `sinks` ([H] logits, one per query head) adds gpt-oss attention sinks.

    >>> q = k = v = torch.ones(1, 2, 3, 4)
    >>> full = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    >>> out, w = eager_attention(None, q, k, v, full, scaling=0.5)
    >>> tuple(out.shape), tuple(w.shape)
    ((1, 3, 2, 4), (1, 2, 3, 3))
    >>> _, w = eager_attention(None, q, k, v, full, scaling=0.5, sinks=torch.tensor([2.0, 2.0]))
    >>> round(w[0, 0, 0].sum().item(), 4)   # e^2 / (3 e^2 + e^2) per key: the sink takes a quarter
    0.75
    """
    groups = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    scores = torch.matmul(q, k.transpose(2, 3)) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        if sinks.shape != (q.shape[1],):
            raise ValueError(f"sinks must hold one logit per query head: shape ({q.shape[1]},), "
                             f"got {tuple(sinks.shape)}")
        probs = _sink_softmax(scores, sinks)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0).to(q.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, v)
    return out.transpose(1, 2), probs
