"""GGUF quantised products with transformers' GGUF kernel API, in plain torch (any device).

`weight` is a uint8 `[rows, bytes_per_row]` tensor of ggml blocks (what `gguf.GGUFReader` gives as a
tensor's `data`) and `ggml_type` its ggml type id: Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8),
Q4_K (12), Q5_K (13), Q6_K (14).
"""

import torch

from ._blocks import BLOCKS, row_bytes
from ._ops import NAMESPACE, OPS

GEMV_TYPES = frozenset(BLOCKS)  # what transformers' `GgufKernel.supports` reads
MAX_GEMV_ROWS = 8  # rows transformers sends to `mul_mat_vec`; any count works here
can_torch_compile = True  # every function is a custom op with a fake
has_backward = False


def mul_mat_vec(weight: torch.Tensor, x: torch.Tensor, ggml_type: int, out_features: int) -> torch.Tensor:
    """`x @ W^T`: `[out_features, bytes_per_row]` uint8 and `[..., K]` -> `[..., out_features]` in x's dtype."""
    return OPS.mul_mat_vec(weight, x, int(ggml_type), int(out_features))


def mul_mat_id(weight: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, ggml_type: int,
               out_features: int) -> torch.Tensor:
    """MoE products: weights `[experts, out_features, bytes]`, x `[T, K]`, ids `[T, top_k]` -> `[T, top_k, out]`."""
    return OPS.mul_mat_id(weight, x, ids, int(ggml_type), int(out_features))


def dequantize(weight: torch.Tensor, ggml_type: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """`[rows, bytes_per_row]` uint8 -> `[rows, cols]` of `dtype`."""
    return OPS.dequantize(weight, int(ggml_type), int(rows), int(cols), dtype)


def get_rows(weight: torch.Tensor, indices: torch.Tensor, ggml_type: int, cols: int,
             dtype: torch.dtype) -> torch.Tensor:
    """The rows `indices` names, unpacked: `[*indices.shape, cols]` of `dtype` (an embedding lookup)."""
    return OPS.get_rows(weight, indices, int(ggml_type), int(cols), dtype)


__all__ = ["GEMV_TYPES", "MAX_GEMV_ROWS", "NAMESPACE", "dequantize", "get_rows", "mul_mat_id", "mul_mat_vec",
           "row_bytes"]
