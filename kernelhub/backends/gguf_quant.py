"""Products with GGUF weights kept in their packed ggml blocks, on the CPU.

A GGUF checkpoint stores a quantised matrix as raw blocks: a uint8 tensor `[out_features,
bytes_per_row]` (what `gguf.GGUFReader` gives as a tensor's `data`) plus its ggml type. This module
serves Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K with the API of transformers' GGUF Hub
kernel (argument order and meaning as in `transformers.integrations.gguf.kernels`):

- `mul_mat_vec(weight, x, ggml_type, out_features)`: `x @ W^T`, `[..., in_features]` ->
  `[..., out_features]` in `x`'s dtype;
- `dequantize(weight, ggml_type, rows, cols, dtype)`: the weight as `[rows, cols]` of `dtype`;
- `get_rows(weight, indices, ggml_type, cols, dtype)`: the rows `indices` names, unpacked
  (an embedding lookup).

Each is a `torch.library` custom op (`kernelhub::gguf_mul_mat`, `kernelhub::gguf_dequantize`,
`kernelhub::gguf_get_rows`) with a fake, so a model calling them compiles whole with
`fullgraph=True`. For 1 to 8 input rows (decode) the product runs in `gguf_quant.c`, which reads
each weight row once and multiplies it, unpacked in registers, by every input row; it is compiled on
first use (`native_build`: a private cache, torch's OpenMP runtime and thread count), for AVX-512
where the CPU has it, else AVX2. `kernelhub::gguf_rows` (`gguf_ops.cpp`, a C++ operator linked to
it, built beside it) is the same product without Python in between, a few microseconds a call:
`GgufLinear` calls it for decode. More rows (prefill) unpack the weight a tile of rows at a time, in
float32, into `F.linear`, so the whole float weight never exists. Activations are never quantised:
products are summed in float32 and rounded once to `x`'s dtype, so results match unpacking the
weight to float32 and multiplying (`torch_dequantize` then `x.float() @ W.T`) to float32 rounding;
both unpackings give gguf-py's float32 values bit for bit. Where the C library cannot be built, the
same functions run on `torch_dequantize` (slower; logged once).

    >>> import gguf, numpy as np
    >>> values = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)   # 2 rows of 64
    >>> w = torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0))
    >>> w.shape, w.dtype                                   # 2 blocks of 34 bytes a row
    (torch.Size([2, 68]), torch.uint8)
    >>> x = torch.ones(1, 64)
    >>> y = mul_mat_vec(w, x, 8, 2)                        # Q8_0 is ggml type 8
    >>> torch.allclose(y, x @ dequantize(w, 8, 2, 64, torch.float32).T)
    True
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as GGML

from kernelhub.backends.native_build import load_library, torch_link_flags
from kernelhub.declare.errors import CheckpointError
from kernelhub.declare.ggml_blocks import block_shape, row_bytes, torch_dequantize, type_name

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gguf_quant.c")
OPS_SOURCE = Path(__file__).with_name("gguf_ops.cpp")  # kernelhub::gguf_rows, linked to SOURCE's library
HEADERS = (SOURCE.with_name("gguf_unpack_avx2.h"), SOURCE.with_name("gguf_unpack_avx512.h"))
# The unpacking is compiled for the widest registers the CPU has: AVX-512 (F, BW, VL, DQ: what torch
# calls AVX512) unpacks and multiplies 16 values an instruction, AVX2 8.
ISA_FLAGS = {"avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"), "avx2": ()}
TYPES = (GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1, GGML.Q8_0, GGML.Q4_K, GGML.Q5_K, GGML.Q6_K)
GEMV_TYPES = frozenset(int(t) for t in TYPES)  # what transformers' `GgufKernel.supports` reads
MAX_GEMV_ROWS = 8  # input rows the C kernel takes in one pass
# Up to this many input rows (a short prompt) the C kernel makes several passes of 8 over the packed
# blocks; more are multiplied a tile of unpacked rows at a time. Measured on a 2-core Zen 3: 16 rows
# 1.6-2.2x and 32 rows 1.1-1.5x faster by passes than by tiles; at 48 rows it depends on the shape.
MAX_PASS_ROWS = 32
TILE_VALUES = 1 << 20  # weights unpacked at once for a prefill: 256 rows of 4096 (4 MB of float32)

_lock = threading.Lock()
_built: tuple[ctypes.CDLL | None, str] | None = None  # (library, why not), once per process
_isa = ""  # which build _built holds
_rows_op = ""  # "" until tried, then "yes" or why kernelhub::gguf_rows is not there


# -- the types (layouts and the torch unpacking live in kernelhub.declare.ggml_blocks) -----------

def check_weight(weight: torch.Tensor, ggml_type: int, in_features: int, out_features: int | None = None) -> None:
    """CheckpointError unless `weight` is `[out_features, row_bytes]` uint8 blocks of `in_features` values."""
    expected = row_bytes(ggml_type, in_features)
    if weight.dtype != torch.uint8 or weight.dim() != 2:
        raise CheckpointError(f"a packed {type_name(ggml_type)} weight is a 2-D uint8 tensor [out_features, "
                              f"bytes_per_row]; got {weight.dtype} of shape {tuple(weight.shape)}")
    if weight.shape[1] != expected:
        values, size = block_shape(ggml_type)
        raise CheckpointError(
            f"a {type_name(ggml_type)} weight for in_features {in_features} has {expected} bytes per row "
            f"({in_features // values} blocks of {size} bytes); this one has {weight.shape[1]}: check the ggml "
            f"type and the layer's in_features")
    if out_features is not None and weight.shape[0] != out_features:
        raise CheckpointError(f"a weight of {weight.shape[0]} rows cannot give out_features {out_features}")


# -- the C library ---------------------------------------------------------------------------

def instruction_sets() -> list[str]:
    """The builds of the C kernel this CPU runs, widest first: `"avx512"` where torch reports AVX-512,
    then `"avx2"`."""
    return ["avx512", "avx2"] if torch.backends.cpu.get_cpu_capability() == "AVX512" else ["avx2"]


def _build(isa: str) -> ctypes.CDLL:
    """The library compiled for `isa` (a key of ISA_FLAGS); RuntimeError saying why it cannot be."""
    library = load_library(SOURCE, ISA_FLAGS[isa], HEADERS)
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.gguf_mul_mat.argtypes = [ptr, i64, ctypes.c_int, ptr, ptr, ptr, ctypes.c_int, i64, i64, i64, ctypes.c_int]
    library.gguf_dequantize.argtypes = [ptr, i64, ctypes.c_int, ptr, i64, i64, i64, ptr, ctypes.c_int]
    library.gguf_mul_mat.restype = library.gguf_dequantize.restype = ctypes.c_int
    return library


def _library() -> tuple[ctypes.CDLL | None, str]:
    global _built, _isa
    if _built is None:
        with _lock:
            if _built is None:
                why = ""
                for isa in instruction_sets():
                    try:
                        library = _build(isa)
                        _isa, _built = isa, (library, "")
                        break
                    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                        why = why or str(e)
                        logger.debug("the %s build of the GGUF kernel failed: %s", isa, e)
                else:
                    _built = (None, why)
                    logger.warning("the GGUF CPU kernel is unavailable: %s; packed GGUF weights are unpacked "
                                   "in torch instead (same results, slower)", why)
    return _built


def _load_rows_op(library: ctypes.CDLL) -> None:
    """Build and register `kernelhub::gguf_rows` (gguf_ops.cpp, linked to `library`) and its fake."""
    load_library(OPS_SOURCE, link=(library._name, *torch_link_flags()), loader=torch.ops.load_library)

    @torch.library.register_fake("kernelhub::gguf_rows")
    def _(weight, x, ggml_type, out_features, bias=None):
        return x.new_empty(*x.shape[:-1], out_features)


@torch.compiler.assume_constant_result
def rows_op_available() -> bool:
    """Whether `kernelhub::gguf_rows` (the C++ operator for 1 to 8 input rows) is registered here,
    building it on the first call. Constant under torch.compile."""
    global _rows_op
    if not _rows_op:
        library = _library()[0]
        with _lock:
            if not _rows_op:
                try:
                    if library is None:
                        raise RuntimeError("the C kernel it calls is unavailable")
                    _load_rows_op(library)
                    _rows_op = "yes"
                except Exception as e:  # noqa: BLE001 - whatever fails, decode keeps the Python operator
                    _rows_op = str(e) or type(e).__name__
                    logger.info("kernelhub::gguf_rows is unavailable (%s); decode products go through the Python "
                                "operator (same results, about 15 us more per call)", e)
    return _rows_op == "yes"


def instruction_set() -> str:
    """Which build of the C kernel runs (`"avx512"` or `"avx2"`), or `""` where none does."""
    return _isa if gguf_kernel_available() else ""


@torch.compiler.assume_constant_result
def gguf_kernel_available() -> bool:
    """Whether the C kernel runs here (building it on the first call). Constant under torch.compile."""
    return _library()[0] is not None


def unavailable_reason() -> str:
    """Why `gguf_kernel_available()` is False ('' when it is True)."""
    return _library()[1]


def _c_library(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library, where it is built and every tensor is a plain CPU tensor."""
    library = _built[0] if _built is not None else _library()[0]
    return library if library is not None and all(t.is_cpu for t in tensors) else None


def _failed(status: int, what: str) -> Exception:
    return RuntimeError(f"kernelhub::{what} failed with status {status}")


# -- the operations -------------------------------------------------------------------------

def _unpack_rows(weight, ggml_type: int, cols: int, ids: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 `[rows, cols]`: every row of `weight` (a checked, contiguous weight), or the rows `ids`
    names (int64, in range), into `out` if given."""
    rows = weight.shape[0] if ids is None else ids.numel()
    library = _c_library(weight)
    if library is None:
        picked = weight if ids is None else weight.index_select(0, ids.to(weight.device))
        values = torch_dequantize(picked, ggml_type, (rows, cols))
        return values if out is None else out.copy_(values)
    out = torch.empty(rows, cols, dtype=torch.float32) if out is None else out
    status = library.gguf_dequantize(weight.data_ptr(), weight.shape[1], ggml_type,
                                     None if ids is None else ids.data_ptr(), rows, weight.shape[0], cols,
                                     out.data_ptr(), torch.get_num_threads())
    if status:
        raise IndexError(f"row ids must lie in 0..{weight.shape[0] - 1}") if status == -4 else \
            _failed(status, "gguf_dequantize")
    return out


def dequantize_eager(weight: torch.Tensor, ggml_type: int, rows: int, cols: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What `kernelhub::gguf_dequantize` computes, called directly."""
    check_weight(weight, ggml_type, cols, rows)
    return _unpack_rows(weight.contiguous(), ggml_type, cols).to(dtype)


def get_rows_eager(weight: torch.Tensor, indices: torch.Tensor, ggml_type: int, cols: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What `kernelhub::gguf_get_rows` computes, called directly."""
    check_weight(weight, ggml_type, cols)
    ids = indices.reshape(-1).to(torch.int64).contiguous()
    values = _unpack_rows(weight.contiguous(), ggml_type, cols, ids)
    return values.to(dtype).reshape(*indices.shape, cols)


def mul_mat_eager(weight: torch.Tensor, x: torch.Tensor, ggml_type: int, out_features: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `kernelhub::gguf_mul_mat` computes, called directly (eager decode makes one call per
    Linear and token; the op's dispatch would add 10-25 us to each)."""
    k = x.shape[-1]
    check_weight(weight, ggml_type, k, out_features)
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise CheckpointError(f"a bias of shape {tuple(bias.shape)} cannot serve out_features {out_features}")
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    weight = weight.contiguous()
    xf = rows.float().contiguous()
    bf = None if bias is None else bias.float().contiguous()
    library = _c_library(weight, x, *([] if bias is None else [bias]))
    if library is not None and 1 <= m <= MAX_PASS_ROWS:
        out = torch.empty(m, out_features, dtype=torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
        for start in range(0, m, MAX_GEMV_ROWS):  # one pass over the blocks per 8 rows
            status = library.gguf_mul_mat(weight.data_ptr(), weight.shape[1], ggml_type, xf[start].data_ptr(),
                                          None if bf is None else bf.data_ptr(), out[start].data_ptr(),
                                          out.dtype == torch.bfloat16, min(MAX_GEMV_ROWS, m - start), out_features,
                                          k, torch.get_num_threads())
            if status:
                raise _failed(status, "gguf_mul_mat")
    else:
        # a tile of weight rows at a time, unpacked to float32 and multiplied by every input row
        out = torch.empty(m, out_features, dtype=torch.float32, device=x.device)
        tile = max(1, TILE_VALUES // k)
        buffer = torch.empty(min(tile, out_features), k) if library is not None and m else None
        for start in range(0, out_features if m else 0, tile):
            part = weight[start:start + tile]
            values = _unpack_rows(part, ggml_type, k, out=None if buffer is None else buffer[:part.shape[0]])
            out[:, start:start + part.shape[0]] = torch.nn.functional.linear(xf, values.to(x.device))
        if bf is not None:
            out += bf.to(out.device)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


@torch.library.custom_op("kernelhub::gguf_mul_mat", mutates_args=())
def gguf_mul_mat(weight: torch.Tensor, x: torch.Tensor, ggml_type: int, out_features: int,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for packed GGUF blocks `weight` [out_features, bytes_per_row] (see `mul_mat_eager`)."""
    return mul_mat_eager(weight, x, ggml_type, out_features, bias)


@gguf_mul_mat.register_fake
def _(weight, x, ggml_type, out_features, bias=None):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("kernelhub::gguf_dequantize", mutates_args=())
def gguf_dequantize(weight: torch.Tensor, ggml_type: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The packed `weight` as `[rows, cols]` of `dtype`."""
    return dequantize_eager(weight, ggml_type, rows, cols, dtype)


@gguf_dequantize.register_fake
def _(weight, ggml_type, rows, cols, dtype):
    return weight.new_empty(rows, cols, dtype=dtype)


@torch.library.custom_op("kernelhub::gguf_get_rows", mutates_args=())
def gguf_get_rows(weight: torch.Tensor, indices: torch.Tensor, ggml_type: int, cols: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """The rows of packed `weight` that `indices` names, as `[*indices.shape, cols]` of `dtype`."""
    return get_rows_eager(weight, indices, ggml_type, cols, dtype)


@gguf_get_rows.register_fake
def _(weight, indices, ggml_type, cols, dtype):
    return weight.new_empty(*indices.shape, cols, dtype=dtype)


# -- transformers' GGUF kernel API ----------------------------------------------------------

def mul_mat_vec(weight: torch.Tensor, x: torch.Tensor, ggml_type: int, out_features: int) -> torch.Tensor:
    """(out_features, bytes_per_row) uint8 @ (M, K) -> (M, out_features), in x's dtype."""
    return torch.ops.kernelhub.gguf_mul_mat(weight, x, ggml_type, out_features, None)


def dequantize(weight: torch.Tensor, ggml_type: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """(rows, bytes_per_row) uint8 -> (rows, cols) of `dtype`."""
    return torch.ops.kernelhub.gguf_dequantize(weight, ggml_type, rows, cols, dtype)


def get_rows(weight: torch.Tensor, indices: torch.Tensor, ggml_type: int, cols: int,
             dtype: torch.dtype) -> torch.Tensor:
    """(N, bytes_per_row) uint8, (R,) ids -> (R, cols) of `dtype`: the rows `indices` names."""
    return torch.ops.kernelhub.gguf_get_rows(weight, indices, ggml_type, cols, dtype)
