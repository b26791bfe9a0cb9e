"""The `flash` backend: flash-attn where it can run, kernelhub's Triton flash kernel elsewhere.

`attn_implementation="flash"` resolves per device and dtype at bind time, and the plan
records what was chosen and why:

1. CUDA with the `flash_attn` package, float16/bfloat16: flash-attn's
   `flash_attn_varlen_func`. Over a paged cache whose block size is a multiple of 256 (which
   flash-attn requires) it reads the block tables itself: decode-only steps through
   `flash_attn_with_kvcache`, others through `flash_attn_varlen_func(block_table=)`; smaller
   blocks are gathered into packed runs first.
2. Otherwise, where Triton runs (a GPU, or a CPU under the Triton interpreter): the
   FlashAttention-2 kernel published from `hub_kernels/flash-attention` (shipped inside
   kernelhub as `kernelhub.flash_kernel`), which reads block tables itself. float32
   inputs run on it with IEEE float32 products, never silently in TF32 or half precision.
3. Nowhere else: on a CPU without the interpreter, binding fails with "flash needs CUDA".

Attention sinks (gpt-oss) run on the Triton kernel, folded into its online softmax, on
every path (packed, block tables). flash-attn 2's kernels have no sink input, so where
flash-attn is chosen, a site with sinks is refused with that reason (the plan says so, and a
preference list moves on); it is never run without them.

A Hub flash kernel (`attn_implementation="kernels-community/flash-attn2"` or any repo
exposing `flash_attn_varlen_func`) is bound through the Hub attention path instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os

import torch

from kernelhub.backends.flash_style import flash_varlen_attention, sink_kwargs
from kernelhub.backends.paged_attention import paged_block_table, paged_varlen
from kernelhub.backends.resolution import Resolution

FLASH_ATTN_DTYPES = (torch.float16, torch.bfloat16)
FLASH_ATTN_PAGE_MULTIPLE = 256  # flash-attn 2 reads a paged cache only in blocks of a multiple of 256 positions


@functools.cache  # a failed import searches every path entry again; ask once per process
def flash_attn_module():
    """The installed `flash_attn` package, or None."""
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        return None


def triton_kernel():
    """kernelhub's Triton flash kernel module, or None when Triton is not installed."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return importlib.import_module("kernelhub.flash_kernel")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_flash(device: torch.device, dtype) -> Resolution:
    """What serves `flash` on `device`/`dtype` (see the module docstring for the order)."""
    fa_problem = ""
    if device.type == "cuda":
        fa = flash_attn_module()
        if fa is not None and dtype in FLASH_ATTN_DTYPES:
            return _flash_attn_resolution(fa)
        fa_problem = ("flash-attn is not installed" if fa is None
                      else f"flash-attn takes float16/bfloat16, not {str(dtype).removeprefix('torch.')}")
    return _triton_resolution(device.type, fa_problem, interpreting())


@functools.cache
def _flash_attn_resolution(fa) -> Resolution:
    version = getattr(fa, "__version__", None) or importlib.metadata.version("flash_attn")
    varlen = fa.flash_attn_varlen_func
    gathered, native = paged_varlen(flash_varlen_attention(varlen)), paged_block_table(varlen)
    with_kvcache = getattr(fa, "flash_attn_with_kvcache", None)  # absent before flash-attn 2.2
    decode = paged_kvcache_decode(with_kvcache) if with_kvcache else native

    def paged(module, q, k_pool, v_pool, mask, **kw):
        if mask.block_size % FLASH_ATTN_PAGE_MULTIPLE:
            return gathered(module, q, k_pool, v_pool, mask, **kw)
        fn = decode if mask.max_seqlen_q == 1 else native
        return fn(module, q, k_pool, v_pool, mask, **kw)

    no_sinks = (f"flash-attn {version} has no attention-sink input (its kernels take no s_aux); bind flex, or "
                "kernelhub's Triton flash kernel (published as the flash-attention Hub kernel), which takes them")
    return Resolution(flash_varlen_attention(varlen), paged, note=f"flash-attn {version}", no_sinks=no_sinks)


@functools.cache
def _triton_resolution(device_type: str, fa_problem: str, interpreted: bool) -> Resolution:
    if device_type == "cpu" and not interpreted:
        return Resolution(problems=(
            "flash needs CUDA: on cpu it runs only under the Triton interpreter (TRITON_INTERPRET=1 set before "
            "triton is imported; slow, meant for tests); use sdpa or flex on cpu",))
    kernel = triton_kernel()
    if kernel is None:
        missing = f"{fa_problem} and triton is not installed" if fa_problem else "triton is not installed"
        return Resolution(problems=(f"flash needs flash-attn or triton on {device_type}: {missing}",))
    why = f"{fa_problem}; " if fa_problem else ""
    where = "Triton interpreter" if device_type == "cpu" else device_type
    return Resolution(flash_varlen_attention(kernel.flash_attn_varlen_func),
                      paged_block_table(kernel.flash_attn_varlen_func),
                      note=f"{why}kernelhub Triton flash kernel ({where})")


def paged_kvcache_decode(with_kvcache):
    """A decode step (one query per sequence) through flash-attn's `flash_attn_with_kvcache`,
    its split-KV decode kernel. The new keys are in the pool already, so none are passed."""

    def attention(module, q, k_pool, v_pool, mask, *, scaling, dropout=0.0, softcap=None, sinks=None):
        out = with_kvcache(q[0].transpose(0, 1).unsqueeze(1), k_pool, v_pool, cache_seqlens=mask.kv_lens,
                           block_table=mask.block_tables, softmax_scale=scaling, causal=True,
                           window_size=mask.window, softcap=softcap or 0.0, **sink_kwargs(sinks))
        return out.transpose(0, 1), None

    return attention


def flash_unresolved(module, *args, **kwargs):
    """The registered `fn` of `flash`: binding replaces it with what `resolve_flash` chose."""
    raise RuntimeError("the flash backend is chosen per device at bind time; use kernelhub.bind")
