"""torch.nn.functional.scaled_dot_product_attention as a backend.

Takes the bool mask, but declares `accepts_is_causal`: when the mask is the plain causal
triangle (or masks nothing) it receives `mask=None` plus `is_causal`, so torch can pick
its fused causal kernel instead of reading a [Q, KV] mask. GQA uses `enable_gqa`, so K/V
are not repeated in memory (except for sinks on CUDA, below).

Attention sinks (gpt-oss) are emulated exactly inside one sdpa call, on every device and
differentiably: each kv head gets one extra all-zero key and value, and the additive mask a
column holding each query head's sink logit. The extra key's score is then exactly the sink
(q . 0 * scale + sink), it joins the softmax denominator, and its zero value adds nothing to
the output. Gradients reach q, k, v and the sinks (through the mask) by torch's own autograd.
A row with no visible key keeps only the sink and gives zeros, as the eager reference does.
The per-head column needs a materialised [B, H, Q, KV + 1] mask, so sink sites never take the
`is_causal` shortcut, and on CUDA K/V are repeated per query head: torch's memory-efficient
kernel, the one there that takes a mask, has no GQA and would leave the call to the math kernel.
"""

import torch
import torch.nn.functional as F

from kernelhub.declare.eager import repeat_kv


def sdpa_attention(module, q, k, v, mask, *, scaling, dropout=0.0, is_causal=False, sinks=None):
    """Attention through torch's fused SDPA kernels; returns no weights.

    >>> q = torch.randn(1, 4, 3, 8); kv = torch.randn(1, 2, 3, 8)
    >>> out, w = sdpa_attention(None, q, kv, kv, None, scaling=8 ** -0.5, is_causal=True)
    >>> tuple(out.shape), w
    ((1, 3, 4, 8), None)
    >>> out, _ = sdpa_attention(None, q, kv, kv, None, scaling=8 ** -0.5, is_causal=True, sinks=torch.zeros(4))
    >>> tuple(out.shape)
    (1, 3, 4, 8)
    """
    if sinks is not None:
        k, v, mask = with_sink_key(q, k, v, mask, is_causal, sinks, repeat_kv_heads=q.device.type != "cpu")
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=mask,
        dropout_p=dropout,  # dropping the sink's share is harmless: its value is zero
        is_causal=is_causal and mask is None,
        scale=scaling,
        enable_gqa=True if q.shape[1] != k.shape[1] else False,  # a bool, guarded (it takes no SymBool)
    )
    return out.transpose(1, 2), None


def with_sink_key(q, k, v, mask, is_causal, sinks, *, repeat_kv_heads=False):
    """K/V with one all-zero key appended per head, and the additive mask [B or 1, H, Q, KV + 1]
    whose last column is `sinks[h]` (see the module docstring). `mask`: bool or additive,
    [Q, KV] or [B or 1, 1 or H, Q, KV], or None with `is_causal` (the site's shortcuts).
    `repeat_kv_heads`: give K/V one head per query head instead of relying on `enable_gqa`."""
    h, q_len, kv_len = q.shape[1], q.shape[2], k.shape[2]
    if repeat_kv_heads:
        k, v = repeat_kv(k, h // k.shape[1]), repeat_kv(v, h // v.shape[1])
    zero = k.new_zeros(*k.shape[:2], 1, k.shape[3])
    k, v = torch.cat([k, zero], dim=2), torch.cat([v, zero], dim=2)
    if mask is None:  # the shortcuts: "causal" is the square top-left triangle, else nothing is masked
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device)
        mask = mask.tril() if is_causal else mask
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    rows = mask.to(q.dtype).expand(mask.shape[0] if mask.dim() == 4 else 1, h, q_len, kv_len)
    column = sinks.to(q.dtype).view(1, h, 1, 1).expand(rows.shape[0], h, q_len, 1)
    return k, v, torch.cat([rows, column], dim=-1)
