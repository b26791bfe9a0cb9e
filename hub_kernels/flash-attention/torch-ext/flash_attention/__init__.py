"""FlashAttention-2 style attention in Triton, with flash-attn's Python API.

`flash_attn_func`, `flash_attn_varlen_func` (optionally over a paged KV cache through
`block_table`) and `flash_attn_with_kvcache` take the arguments flash-attn takes, so code
written for flash-attn runs on this kernel unchanged, on any GPU Triton supports.
"""

from ._ops import (flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, reference_varlen_attention,
                   uses_triton)

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "reference_varlen_attention",
           "uses_triton"]
