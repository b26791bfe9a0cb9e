"""torch.nn.functional.scaled_dot_product_attention as a backend.

Takes the bool mask, but declares `accepts_is_causal`: when the mask is the plain causal
triangle (or masks nothing) it receives `mask=None` plus `is_causal`, so torch can pick
its fused causal kernel instead of reading a [Q, KV] mask. GQA uses `enable_gqa`, so K/V
are never repeated in memory.
"""

import torch.nn.functional as F


def sdpa_attention(module, q, k, v, mask, *, scaling, dropout=0.0, is_causal=False):
    """Attention through torch's fused SDPA kernels; returns no weights.

    >>> import torch
    >>> q = torch.randn(1, 4, 3, 8); kv = torch.randn(1, 2, 3, 8)
    >>> out, w = sdpa_attention(None, q, kv, kv, None, scaling=8 ** -0.5, is_causal=True)
    >>> tuple(out.shape), w
    ((1, 3, 4, 8), None)
    """
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=is_causal and mask is None,
        scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(1, 2), None
