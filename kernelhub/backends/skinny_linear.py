"""A CPU matmul for 1 to 8 input rows (decode), float32 or bfloat16 weights, hand-written for AVX2.

Decode multiplies one row per sequence by every weight matrix. Library GEMMs are tuned for
many rows: on a 2-core AVX2 CPU, `F.linear` on 8 rows reads float32 weights at about 6 GB/s and
bfloat16 weights at under 2 (it has no fast bf16 path without avx512_bf16), and inductor's
multiply-reduce keeps one dependent add chain per output, which caps 8 bf16 rows at about 3 GB/s.
`skinny_linear.c` reads each weight row once, widens bf16 with a shift, and multiplies it by every
input row while it is in a register, with enough independent FMA chains in flight to keep both
FMA units busy (`bench/gemv.py`).

The C source ships with kernelhub and is compiled on first use with the system C compiler
(`native_build.build_library`: cached under kernelhub's cache directory, private to the user,
linked to the OpenMP runtime torch loaded); each call runs `torch.get_num_threads()` threads. The
`gemv` Linear kernel calls it; on its own:

    >>> x, w = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    >>> torch.ops.kernelhub.skinny_linear(x, w, None) if skinny_available() else x @ w.T
    tensor([[11., 17., 23.]])

Products are summed in float32 and rounded once to the input's dtype, as `F.linear` does.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
from pathlib import Path

import torch

from kernelhub.backends.native_build import load_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny_linear.c")
MAX_ROWS = 8
DTYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_built: tuple[ctypes.CDLL | None, str] | None = None  # (library, why not), once per process


def _build() -> ctypes.CDLL:
    """Compile (or reuse) this kernel's library; raises RuntimeError saying why it cannot."""
    library = load_library(SOURCE)
    library.skinny_linear.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int]
    library.skinny_linear.restype = ctypes.c_int
    return library


def _library() -> tuple[ctypes.CDLL | None, str]:
    global _built
    if _built is None:
        with _lock:
            if _built is None:
                try:
                    _built = (_build(), "")
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    _built = (None, str(e))
                    logger.warning("the AVX2 skinny Linear kernel is unavailable: %s; few-row Linear calls "
                                   "run as oneDNN or F.linear instead", e)
    return _built


@torch.compiler.assume_constant_result
def skinny_available() -> bool:
    """Whether the kernel runs here (building it on the first call). Constant under torch.compile."""
    return _library()[0] is not None


def unavailable_reason() -> str:
    """Why `skinny_available()` is False ('' when it is True)."""
    return _library()[1]


def _problem(x, weight, bias) -> str | None:
    """What about these inputs the kernel cannot take, or None. Plain early returns: this runs on
    every call (about 120 a decode step), so it costs well under a microsecond."""
    if x.dim() == 0:
        return "x is a scalar; it needs a last dimension of columns"
    k = x.shape[-1]
    if not (x.is_cpu and weight.is_cpu):
        return f"x is on {x.device}, weight on {weight.device}; both must be on the CPU"
    if x.dtype != weight.dtype or weight.dtype not in DTYPES:
        return f"dtypes {x.dtype} and {weight.dtype}; both must be one of float32, bfloat16"
    if weight.dim() != 2 or weight.shape[1] != k:
        return f"weight of shape {tuple(weight.shape)} cannot multiply x with {k} columns"
    rows = x.numel() // k if k else 0
    if not 1 <= rows <= MAX_ROWS:
        return f"x has {rows} rows; 1 to {MAX_ROWS} are served"
    if bias is not None and not (bias.is_cpu and bias.dim() == 1 and bias.shape[0] == weight.shape[0]):
        return f"bias of shape {tuple(bias.shape)} on {bias.device}; it must be ({weight.shape[0]},) on the CPU"
    return None


def skinny_linear_eager(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What `kernelhub::skinny_linear` computes, called directly: eager decode makes ~120 of these
    calls a step, and the op's dispatch would add 10-25 us to each (this call costs about 11 us
    besides the kernel's work)."""
    library = _built[0] if _built is not None else _library()[0]
    if library is None:
        raise RuntimeError(f"kernelhub::skinny_linear is unavailable: {_library()[1]}")
    problem = _problem(x, weight, bias)
    if problem is not None:
        raise ValueError(f"kernelhub::skinny_linear: {problem}")
    n, k = weight.shape
    if not x.is_contiguous():
        x = x.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    if bias is not None and (bias.dtype != weight.dtype or not bias.is_contiguous()):
        bias = bias.to(weight.dtype).contiguous()
    out = x.new_empty((*x.shape[:-1], n))  # on x's device, the CPU, whatever the default device
    # OpenMP's thread count is per calling thread: pass torch's, which is what the caller set
    failed = library.skinny_linear(weight.data_ptr(), weight.dtype is torch.bfloat16, x.data_ptr(),
                                   None if bias is None else bias.data_ptr(), out.data_ptr(), x.numel() // k, n, k,
                                   torch.get_num_threads())
    if failed:
        raise (MemoryError if failed == -2 else ValueError)(f"kernelhub::skinny_linear failed ({failed}) on "
                                                             f"{x.numel() // k} rows of {k}")
    return out


@torch.library.custom_op("kernelhub::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b for `x` of 1 to 8 rows (all dims but the last), through `skinny_linear.c`."""
    return skinny_linear_eager(x, weight, bias)


@skinny_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
