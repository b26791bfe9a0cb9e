"""How backends read a paged KV cache beyond the dense path (`kernelhub.declare.paged`).

- natively, through the block table (kernelhub's Triton flash kernel, flash-attn):
  `paged_block_table`;
- `paged_varlen`: the sequences' keys are gathered into one packed run for a varlen kernel.

`paged_adapter` picks the gathering adapter for a backend's mask format at bind time. Every
adapter passes a site's attention sinks (`sinks=`) on to the function it wraps.
"""

from __future__ import annotations

import torch

from kernelhub.backends.flash_style import sink_kwargs
from kernelhub.declare.paged import PagedMask, paged_dense
from kernelhub.declare.varlen import VarlenMask


def paged_varlen(fn):
    """Serve a paged cache with a varlen backend `fn` by gathering keys into one packed run."""

    def attention(module, q, k_pool, v_pool, mask: PagedMask, *, scaling, dropout=0.0, **kw):
        slots = mask.key_slots()
        k = k_pool.view(-1, *k_pool.shape[2:])[slots].transpose(0, 1)[None]
        v = v_pool.view(-1, *v_pool.shape[2:])[slots].transpose(0, 1)[None]
        varlen = mask.memo("varlen", lambda: VarlenMask(
            cu_seqlens_q=mask.cu_seqlens_q, cu_seqlens_k=mask.cu_seqlens_k, max_seqlen_q=mask.max_seqlen_q,
            max_seqlen_k=mask.max_seqlen_k, q_index=torch.arange(q.shape[2], device=q.device),
            k_index=torch.arange(slots.shape[0], device=q.device), causal=True, window=mask.window))
        return fn(module, q, k, v, varlen, scaling=scaling, dropout=dropout, **kw)

    return attention


def paged_block_table(varlen_fn):
    """Serve a paged cache with a flash-attn style `flash_attn_varlen_func(..., block_table=)`,
    which reads the pool through the block tables itself; sinks go as `s_aux`, as in `flash_style`."""

    def attention(module, q, k_pool, v_pool, mask: PagedMask, *, scaling, dropout=0.0, softcap=None, sinks=None):
        out = varlen_fn(q[0].transpose(0, 1), k_pool, v_pool, mask.cu_seqlens_q, mask.cu_seqlens_k,
                        mask.max_seqlen_q, mask.max_seqlen_k, dropout_p=dropout, softmax_scale=scaling,
                        causal=True, window_size=mask.window, softcap=softcap or 0.0,
                        block_table=mask.block_tables, **sink_kwargs(sinks))
        if isinstance(out, tuple):
            out = out[0]
        return out[None], None

    return attention


def paged_adapter(fn, mask_format: str):
    """The gathering adapter for a backend of `mask_format` (bind time)."""
    return paged_varlen(fn) if mask_format == "varlen" else paged_dense(fn, mask_format)
