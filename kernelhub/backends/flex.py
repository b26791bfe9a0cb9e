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

Attention sinks go through the log-sum-exp: flex returns each row's LSE over the visible keys
(`return_aux=AuxRequest(lse=True)`), and a sink logit s joins the denominator as
`out * exp(lse) / (exp(lse) + exp(s)) = out * sigmoid(lse - s)`; a fully masked row has
lse = -inf and stays zero. torch 2.13's compiled CPU flex kernel cannot return the LSE
("torch.compile on CPU only supports inference and `return_lse` is not supported yet"), so
on CPU a site with sinks runs flex uncompiled, and binding flex to one under
`mode=TORCH_COMPILE` on CPU is refused with that reason. CUDA compiles it.
"""

import functools
import logging
import os
import warnings

import torch
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from kernelhub.backends.resolution import Resolution
from kernelhub.declare.log import first_time
from kernelhub.declare.paged import paged_dense

COMPILE = None  # None: decided from KERNELHUB_FLEX_COMPILE on first use
# torch warns (once, several lines) when flex_attention runs without torch.compile; kernelhub runs it
# eagerly on purpose (paged steps, sinks on CPU, KERNELHUB_FLEX_COMPILE=0), so that warning is silenced there
EAGER_WARNING = r"flex_attention called without torch\.compile"

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


def apply_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Fold sink logits [H] into an attention output [B, H, Q, D] normalised over the keys only,
    given its log-sum-exp [B, H, Q]: the sink's share of each row's softmax mass is removed.

    >>> out, lse = torch.ones(1, 1, 1, 2), torch.zeros(1, 1, 1)   # one key: exp(lse) = 1
    >>> apply_sinks(out, lse, torch.zeros(1)).tolist()            # a sink of logit 0 takes half
    [[[[0.5, 0.5]]]]
    """
    keep = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
    return (out.float() * keep[..., None]).to(out.dtype)


# torch's inductor lowers flex_attention on CPU to a C++ template with two bugs (torch 2.13) that
# give silently wrong logits, different on every run; kernelhub hands it inputs that avoid both:
# 1. Its q @ k^T micro-GEMM (`CppMicroGemmFP32Vec`, transposed B) takes a fast path when head_dim is
#    a multiple of the float vector width and below 24, and that path ignores the tail width: when a
#    key block ends in a partial 8-column tile (key length 8 mod 16 on AVX2) it reads keys past the
#    block and writes scores past the row, over the softmax's running max/sum. Zero columns add
#    nothing to q.k, so q and k padded to head_dim 24 give the same attention through its general path.
# 2. It reads each input from its buffer's start, ignoring a view's storage offset: v split from a
#    fused qkv projection reads q's columns. Views smaller than their base (which may start past
#    its start) are copied; whole buffers (a static cache's keys and values) pass through uncopied.
CPU_COMPILE_SAFE_HEAD_DIM = 24


def inductor_cpu_safe(q, k, v):
    """q, k, v as inductor's CPU flex kernel computes them correctly (see above); same attention.

    >>> qkv = torch.randn(1, 3, 2, 2, 16).unbind(1)   # views into one buffer, head_dim 16
    >>> q, k, v = inductor_cpu_safe(*qkv)
    >>> q.shape[-1], k.shape[-1], v.shape[-1], v.storage_offset()
    (24, 24, 16, 0)
    """
    if q.device.type != "cpu":
        return q, k, v
    d = q.shape[-1]
    if d % 8 == 0 and d < CPU_COMPILE_SAFE_HEAD_DIM:
        pad = (0, CPU_COMPILE_SAFE_HEAD_DIM - d)
        q, k = torch.nn.functional.pad(q, pad), torch.nn.functional.pad(k, pad)
    # `_base` is what dynamo and export can see of a view; `storage_offset()` would break the graph
    return tuple(t.clone(memory_format=torch.contiguous_format)
                 if t._base is not None and t._base.numel() != t.numel() else t for t in (q, k, v))


def _run(flex, q, k, v, sinks, **args):
    if flex is not flex_attention or torch.compiler.is_compiling():  # inductor generates the kernel
        q, k, v = inductor_cpu_safe(q, k, v)
        return _call(flex, q, k, v, sinks, **args)
    with warnings.catch_warnings():  # eager on purpose: not torch's "called without torch.compile" advice
        warnings.filterwarnings("ignore", message=EAGER_WARNING, category=UserWarning)
        return _call(flex, q, k, v, sinks, **args)


def _call(flex, q, k, v, sinks, **args):
    if sinks is None:
        return flex(q, k, v, **args).transpose(1, 2), None
    out, aux = flex(q, k, v, return_aux=AuxRequest(lse=True), **args)
    return apply_sinks(out, aux.lse, sinks).transpose(1, 2), None


def flex_attention_backend(module, q, k, v, block_mask, *, scaling, dropout=0.0, softcap=None, sinks=None):
    """Attention through flex_attention with a BlockMask; returns no weights.

    >>> from kernelhub.declare.attention_mask import AttentionMask
    >>> m = AttentionMask.build(batch=1, q_len=4).materialize("block_mask")
    >>> q = torch.randn(1, 2, 4, 16)
    >>> tuple(flex_attention_backend(None, q, q, q, m, scaling=0.25)[0].shape)
    (1, 4, 2, 16)
    >>> tuple(flex_attention_backend(None, q, q, q, m, scaling=0.25, sinks=torch.zeros(2))[0].shape)
    (1, 4, 2, 16)
    """
    global COMPILE
    args = dict(score_mod=softcap_score_mod(float(softcap)) if softcap else None, block_mask=block_mask,
                scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    # The compiled CPU kernel has no LSE (module docstring): sinks on CPU run uncompiled.
    if _use_compiled() and (sinks is None or q.device.type != "cpu"):
        if first_time(("flex compile", q.device.type, q.dtype)):
            logger.info("compiling flex attention for %s/%s (first call takes a while)", q.device.type,
                        str(q.dtype).removeprefix("torch."))
        try:
            return _run(compiled_flex_attention(), q, k, v, sinks, **args)
        except Exception as e:  # noqa: BLE001 - a compiler failure; a genuine input error re-raises below
            COMPILE = False
            first_line = (str(e).splitlines() or [""])[0][:200]
            logger.warning("compiling flex_attention failed (%s: %s); kernelhub uses the uncompiled flex path "
                           "from now on", type(e).__name__, first_line)
            logger.debug("flex_attention compile failure", exc_info=True)
    return _run(flex_attention, q, k, v, sinks, **args)


def flex_attention_uncompiled(module, q, k, v, block_mask, *, scaling, dropout=0.0, softcap=None, sinks=None):
    """flex_attention without torch.compile (materialises scores; for shapes that change every call)."""
    score_mod = softcap_score_mod(float(softcap)) if softcap else None
    return _run(flex_attention, q, k, v, sinks, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                enable_gqa=q.shape[1] != k.shape[1])


NO_CPU_COMPILED_LSE = ("torch's compiled CPU flex_attention cannot return the log-sum-exp that sinks need "
                       f"(torch {torch.__version__.split('+')[0]}); bind flex without mode=TORCH_COMPILE on cpu, "
                       "or sdpa, which computes sinks compiled on cpu")


def resolve_flex(device, dtype):
    """Compiled flex for plain forwards; uncompiled over a paged cache (see the module docstring)."""
    return Resolution(flex_attention_backend, paged_dense(flex_attention_uncompiled, "block_mask"),
                      no_sinks_compiled=NO_CPU_COMPILED_LSE if device.type == "cpu" else "")
