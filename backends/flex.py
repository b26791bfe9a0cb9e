"""flex attention as a backend: a BlockMask built from the semantic mask functions.

The compiled kernel is created lazily, once per process (torch.compile caches per shape
family). Set `KERNELHUB_FLEX_COMPILE=0` (read on first use) or
`kernelhub.backends.flex.COMPILE = False` for the uncompiled path, which materialises
scores and suits tests and debugging. If compiling fails (inductor's CPU code generation
has failed for some dynamic shapes), the call is retried uncompiled, a WARNING on the
`kernelhub.backends.flex` logger says why (the traceback at DEBUG), and later calls stay
uncompiled: never a crash, never a wrong result.

Over a paged KV cache (continuous batching) flex always runs uncompiled: every step has new
shapes, and each would cost a compilation.
"""

import functools
import logging
import os

import torch
from torch.nn.attention.flex_attention import flex_attention

from kernelhub.backends.resolution import Resolution
from kernelhub.declare.paged import paged_dense

COMPILE = None  # None: decided from KERNELHUB_FLEX_COMPILE on first use

logger = logging.getLogger(__name__)


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


def _use_compiled() -> bool:
    global COMPILE
    if COMPILE is None:
        COMPILE = os.environ.get("KERNELHUB_FLEX_COMPILE", "1") != "0"
    return COMPILE and not torch.compiler.is_compiling()


def flex_attention_backend(module, q, k, v, block_mask, *, scaling, dropout=0.0, softcap=None):
    """Attention through flex_attention with a BlockMask; returns no weights.

    >>> from kernelhub.declare.attention_mask import AttentionMask
    >>> m = AttentionMask.build(batch=1, q_len=4).materialize("block_mask")
    >>> q = torch.randn(1, 2, 4, 16)
    >>> tuple(flex_attention_backend(None, q, q, q, m, scaling=0.25)[0].shape)
    (1, 4, 2, 16)
    """
    global COMPILE
    args = dict(score_mod=softcap_score_mod(float(softcap)) if softcap else None, block_mask=block_mask,
                scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    if _use_compiled():
        try:
            return compiled_flex_attention()(q, k, v, **args).transpose(1, 2), None
        except Exception as e:  # noqa: BLE001 - a compiler failure; a genuine input error re-raises below
            COMPILE = False
            first_line = (str(e).splitlines() or [""])[0][:200]
            logger.warning("compiling flex_attention failed (%s: %s); kernelhub uses the uncompiled flex path "
                           "from now on", type(e).__name__, first_line)
            logger.debug("flex_attention compile failure", exc_info=True)
    return flex_attention(q, k, v, **args).transpose(1, 2), None


def flex_attention_uncompiled(module, q, k, v, block_mask, *, scaling, dropout=0.0, softcap=None):
    """flex_attention without torch.compile (materialises scores; for shapes that change every call)."""
    score_mod = softcap_score_mod(float(softcap)) if softcap else None
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                          enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2), None


def resolve_flex(device, dtype):
    """Compiled flex for plain forwards; uncompiled over a paged cache (see the module docstring)."""
    return Resolution(flex_attention_backend, paged_dense(flex_attention_uncompiled, "block_mask"))
