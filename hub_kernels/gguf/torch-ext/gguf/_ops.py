"""transformers' GGUF kernel API as `torch.library` custom ops, in plain torch.

Each product unpacks a tile of weight rows to float32 at a time (`_blocks.unpack`) and multiplies it
by every input row in float32, rounding once to the input's dtype, so the whole float weight never
exists and results equal unpacking the weight and multiplying (to float32 rounding). The op
namespace is `gguf_<hash of these files>`: two versions of the kernel never share an op, and the
same files imported twice (under two module names) register once. Every op has a fake, so a model
calling them compiles with `fullgraph=True`.
"""

import hashlib
import inspect
import sys

import torch

from . import _blocks
from ._blocks import unpack

TILE_VALUES = 1 << 22  # weight values unpacked at once: 16 MB of float32
NAMESPACE = "gguf_" + hashlib.sha256((inspect.getsource(sys.modules[__name__])
                                      + inspect.getsource(_blocks)).encode()).hexdigest()[:16]


def _check_rows(weight: torch.Tensor, rows: int) -> None:
    if weight.dim() != 2 or weight.shape[0] != rows:
        raise ValueError(f"the packed weight has shape {tuple(weight.shape)}; expected {rows} rows")


def _product(weight: torch.Tensor, x: torch.Tensor, ggml_type: int, out_features: int) -> torch.Tensor:
    """Float32 `[M, out_features]` for float32 rows `x` `[M, K]`, a tile of weight rows at a time."""
    _check_rows(weight, out_features)
    k = x.shape[-1]
    out = torch.empty(x.shape[0], out_features, dtype=torch.float32, device=x.device)
    tile = max(1, TILE_VALUES // k)
    for start in range(0, out_features, tile):
        values = unpack(weight[start:start + tile], ggml_type, k).to(x.device)
        out[:, start:start + values.shape[0]] = x @ values.T
    return out


def mul_mat_vec_impl(weight, x, ggml_type, out_features):
    rows = x.reshape(-1, x.shape[-1]).float()
    out = _product(weight, rows, ggml_type, out_features)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


def mul_mat_id_impl(weight, x, ids, ggml_type, out_features):
    if weight.dim() != 3 or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"mul_mat_id takes weights [experts, rows, bytes], x [T, K] and ids [T, top_k]; got "
                         f"{tuple(weight.shape)}, {tuple(x.shape)}, {tuple(ids.shape)}")
    out = torch.zeros(*ids.shape, out_features, dtype=torch.float32, device=x.device)
    rows = x.float()
    for expert in ids.unique().tolist():
        token, slot = (ids == expert).nonzero(as_tuple=True)
        out[token, slot] = _product(weight[expert], rows[token], ggml_type, out_features)
    return out.to(x.dtype)


def _register():
    """Define the ops once per namespace (a second import of the same bytes finds them)."""
    if hasattr(getattr(torch.ops, NAMESPACE), "mul_mat_vec"):
        return

    @torch.library.custom_op(f"{NAMESPACE}::mul_mat_vec", mutates_args=())
    def mul_mat_vec(weight: torch.Tensor, x: torch.Tensor, ggml_type: int, out_features: int) -> torch.Tensor:
        return mul_mat_vec_impl(weight, x, ggml_type, out_features)

    @mul_mat_vec.register_fake
    def _(weight, x, ggml_type, out_features):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.custom_op(f"{NAMESPACE}::mul_mat_id", mutates_args=())
    def mul_mat_id(weight: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, ggml_type: int,
                   out_features: int) -> torch.Tensor:
        return mul_mat_id_impl(weight, x, ids, ggml_type, out_features)

    @mul_mat_id.register_fake
    def _(weight, x, ids, ggml_type, out_features):
        return x.new_empty(*ids.shape, out_features)

    @torch.library.custom_op(f"{NAMESPACE}::dequantize", mutates_args=())
    def dequantize(weight: torch.Tensor, ggml_type: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        _check_rows(weight, rows)
        return unpack(weight, ggml_type, cols).to(dtype)

    @dequantize.register_fake
    def _(weight, ggml_type, rows, cols, dtype):
        return weight.new_empty(rows, cols, dtype=dtype)

    @torch.library.custom_op(f"{NAMESPACE}::get_rows", mutates_args=())
    def get_rows(weight: torch.Tensor, indices: torch.Tensor, ggml_type: int, cols: int,
                 dtype: torch.dtype) -> torch.Tensor:
        picked = weight.index_select(0, indices.reshape(-1).to(device=weight.device, dtype=torch.long))
        return unpack(picked, ggml_type, cols).to(dtype).reshape(*indices.shape, cols)

    @get_rows.register_fake
    def _(weight, indices, ggml_type, cols, dtype):
        return weight.new_empty(*indices.shape, cols, dtype=dtype)


_register()
OPS = getattr(torch.ops, NAMESPACE)
