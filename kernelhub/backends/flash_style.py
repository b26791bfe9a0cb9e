"""Adapting a flash-attn style `flash_attn_varlen_func` to kernelhub's backend signature.

Any kernel exposing the flash-attn varlen API (flash-attn itself, a Hub flash kernel, a
test double) becomes a backend with the `varlen` mask format: real tokens are gathered
into one packed sequence, the kernel runs on it, and outputs are scattered back, so
padding costs no compute and no dense mask is ever built. Attention sinks are passed as
`s_aux` (the keyword vLLM's flash-attn and kernelhub's Triton kernel take), only when a site
has them: a kernel without that keyword fails loudly instead of dropping them.

>>> import torch
>>> from kernelhub.declare.attention_mask import AttentionMask
>>> def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
...     return q  # shape check only
>>> fn = flash_varlen_attention(fake_varlen)
>>> q = torch.randn(1, 2, 3, 4)
>>> out, weights = fn(None, q, q, q, AttentionMask.build(batch=1, q_len=3).materialize("varlen"), scaling=0.5)
>>> tuple(out.shape), weights
((1, 3, 2, 4), None)
"""

from __future__ import annotations


def flash_varlen_attention(varlen_fn):
    """A kernelhub backend fn (mask_format "varlen") that calls `varlen_fn` flash-attn style."""

    def attention(module, q, k, v, mask, *, scaling, dropout=0.0, softcap=None, sinks=None):
        b, h, q_len, d = q.shape
        h_kv, kv_len = k.shape[1], k.shape[2]
        q_packed = q.transpose(1, 2).reshape(b * q_len, h, d)[mask.q_index]
        k_packed = k.transpose(1, 2).reshape(b * kv_len, h_kv, d)[mask.k_index]
        v_packed = v.transpose(1, 2).reshape(b * kv_len, h_kv, d)[mask.k_index]
        out = varlen_fn(q_packed, k_packed, v_packed, mask.cu_seqlens_q, mask.cu_seqlens_k,
                        mask.max_seqlen_q, mask.max_seqlen_k, dropout_p=dropout, softmax_scale=scaling,
                        causal=mask.causal, window_size=mask.window, softcap=softcap or 0.0, **sink_kwargs(sinks))
        if isinstance(out, tuple):  # some builds return (out, softmax_lse, ...)
            out = out[0]
        full = q.new_zeros(b * q_len, h, d)
        full[mask.q_index] = out.to(q.dtype)
        return full.view(b, q_len, h, d), None

    attention.__name__ = getattr(varlen_fn, "__name__", "flash_attn_varlen_func")
    attention.__wrapped__ = varlen_fn
    return attention


def sink_kwargs(sinks) -> dict:
    """`{"s_aux": sinks}` when a site has attention sinks, else nothing (older kernels lack the keyword)."""
    return {} if sinks is None else {"s_aux": sinks}
