"""A test double of the `flash_attn` package: its varlen API, computed by a plain PyTorch
reference, recording how it was called (CUDA and flash-attn cannot run on this machine)."""

import types

import torch

from kernelhub.flash_kernel import reference_varlen_attention


def make_flash_attn(version="2.7.4"):
    module = types.ModuleType("flash_attn")
    module.__version__ = version
    module.calls = []

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
        if q.dtype not in (torch.float16, torch.bfloat16):
            raise RuntimeError("FlashAttention only supports fp16 and bf16 data type")  # what flash-attn says
        if block_table is not None and k.shape[1] % 256:
            raise RuntimeError("Paged KV cache block size must be divisible by 256")
        module.calls.append({"paged": block_table is not None, "causal": causal, "window": window_size})
        seq_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]) if block_table is not None else None
        left, right = window_size[0], 0 if causal else window_size[1]
        return reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, seq_k, block_table, softmax_scale,
                                          softcap, left, right)

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, block_table=None,
                                softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **kw):
        if k_cache.shape[1] % 256:
            raise RuntimeError("Paged KV cache block size must be divisible by 256")
        module.calls.append({"paged": True, "kvcache": True, "causal": causal, "window": window_size})
        b, s_q = q.shape[:2]
        cu_q = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32)
        cu_k = torch.nn.functional.pad(cache_seqlens.cumsum(0), (1, 0)).to(torch.int32)
        left, right = window_size[0], 0 if causal else window_size[1]
        out = reference_varlen_attention(q.reshape(b * s_q, *q.shape[2:]), k_cache, v_cache, cu_q, cu_k,
                                         cache_seqlens, block_table, softmax_scale, softcap, left, right)
        return out.view(q.shape)

    module.flash_attn_varlen_func = flash_attn_varlen_func
    module.flash_attn_with_kvcache = flash_attn_with_kvcache
    return module


def install_flash_attn(monkeypatch, version="2.7.4"):
    """Make kernelhub find the double as the installed flash-attn, for this test; returns it."""
    from kernelhub.backends import flash

    module = make_flash_attn(version)
    monkeypatch.setattr(flash, "flash_attn_module", lambda: module)
    return module
