"""flex attention as a backend: a BlockMask built from the semantic mask functions.

The compiled kernel is created lazily, once per process (torch.compile caches per shape
family). Set `kernelhub.backends.flex.COMPILE = False` (or the environment variable
`KERNELHUB_FLEX_COMPILE=0`) for the uncompiled path, which materialises scores and
suits tests and debugging.
"""

import functools
import os

import torch
from torch.nn.attention.flex_attention import flex_attention

COMPILE = os.environ.get("KERNELHUB_FLEX_COMPILE", "1") != "0"


@functools.cache
def compiled_flex_attention():
    """The process-wide compiled flex_attention (built on first use)."""
    return torch.compile(flex_attention)


@functools.cache
def softcap_score_mod(softcap: float):
    """A score_mod that applies tanh soft-capping; cached so compiled graphs are reused."""

    def score_mod(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    return score_mod


def flex_attention_backend(module, q, k, v, block_mask, *, scaling, softcap=None, **kw):
    """Attention through flex_attention with a BlockMask; returns no weights.

    >>> from kernelhub.backends.attention_mask import AttentionMask
    >>> m = AttentionMask.build(batch=1, q_len=4).materialize("block_mask")
    >>> q = torch.randn(1, 2, 4, 16)
    >>> tuple(flex_attention_backend(None, q, q, q, m, scaling=0.25)[0].shape)
    (1, 4, 2, 16)
    """
    run = compiled_flex_attention() if COMPILE and not torch.compiler.is_compiling() else flex_attention
    out = run(
        q, k, v,
        score_mod=softcap_score_mod(float(softcap)) if softcap else None,
        block_mask=block_mask,
        scale=scaling,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(1, 2), None
