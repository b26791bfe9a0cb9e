"""A CPU matmul for 1 to 8 input rows (decode), float32 or bfloat16 weights, hand-written for AVX2.

Decode multiplies one row per sequence by every weight matrix. Library GEMMs are tuned for
many rows: on a 2-core AVX2 CPU, `F.linear` on 8 rows reads float32 weights at about 6 GB/s and
bfloat16 weights at under 2 (it has no fast bf16 path without avx512_bf16), and inductor's
multiply-reduce keeps one dependent add chain per output, which caps 8 bf16 rows at about 3 GB/s.
`skinny_linear.c` reads each weight row once, widens bf16 with a shift, and multiplies it by every
input row while it is in a register, with enough independent FMA chains in flight to keep both
FMA units busy (`bench/gemv.py`).

The C source ships with kernelhub and is compiled on first use with the system C compiler (`$CC`,
else `cc`) into `cpu/` under kernelhub's cache directory (`$KERNELHUB_CACHE`, else
`$XDG_CACHE_HOME/kernelhub` or `~/.cache/kernelhub`), keyed by a hash of the source, the compiler's
name, the flags and torch's OpenMP runtime. The directory and the library must be private to the
user (owned, not writable by others), or they are refused. The library links the OpenMP runtime
torch loaded, and each call runs `torch.get_num_threads()` threads. The `gemv` Linear kernel
calls it; on its own:

    >>> x, w = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    >>> torch.ops.kernelhub.skinny_linear(x, w, None) if skinny_available() else x @ w.T
    tensor([[11., 17., 23.]])

Products are summed in float32 and rounded once to the input's dtype, as `F.linear` does.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from kernelhub.declare.cache_dir import cache_root

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny_linear.c")
MAX_ROWS = 8
DTYPES = (torch.float32, torch.bfloat16)
FLAGS = ["-O3", "-mavx2", "-mfma", "-fPIC", "-fopenmp", "-std=gnu11"]

_lock = threading.Lock()
_built: tuple[ctypes.CDLL | None, str] | None = None  # (library, why not), once per process


def torch_openmp() -> str | None:
    """The file of the OpenMP runtime torch loaded into this process (linking it, not the
    toolchain's, keeps one thread pool: two runtimes would each spin threads on the same cores)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "libgomp" in line or "libiomp" in line}
    except OSError:
        return None
    paths = {p for p in paths if os.path.isfile(p)}  # not "(deleted)" entries
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    ours = sorted(p for p in paths if os.path.dirname(p) == torch_lib)  # before another package's copy
    return (ours or sorted(paths) or [None])[0]


def _private(path: Path) -> None:
    """Refuse `path` unless this user owns it and no one else may write to it: a library loaded
    from a cache another user can write to would run their code."""
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(f"{str(path)!r} is not private to this user (owner uid {info.st_uid}, mode "
                           f"{info.st_mode & 0o777:o}); remove it or point KERNELHUB_CACHE elsewhere")


def _compile(compiler: str, openmp: str, target: Path, source: Path = SOURCE) -> None:
    """Build the library of `source` into `target`, in a private temporary directory beside it."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        obj, lib = work / f"{source.stem}.o", work / target.name
        steps = [[compiler, *FLAGS, "-c", str(source), "-o", str(obj)],
                 # link torch's runtime by file: its soname is what the loader finds already loaded
                 [compiler, "-shared", str(obj), openmp, "-o", str(lib)]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(step[:2])} ... failed: {done.stderr.strip()[-500:]}")
        os.chmod(lib, 0o755)
        os.replace(lib, target)  # atomic: a process building the same key at once is harmless
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_library(source: Path) -> ctypes.CDLL:
    """Compile (or reuse) the shared library of the C file `source`, cached as `cpu/<stem>-<key>.so`;
    raises RuntimeError saying why it cannot. Other built-in CPU kernels build their C source here."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.exists("/proc/self/maps"):
        raise RuntimeError(f"it is written for x86-64 Linux, not {platform.system()} {platform.machine()}")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise RuntimeError(f"it needs AVX2 and FMA; torch reports this CPU as {capability}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    openmp = torch_openmp()
    if openmp is None:
        raise RuntimeError("torch's OpenMP runtime (libgomp) is not loaded in this process")
    text = source.read_bytes()
    key = hashlib.sha256(b"\0".join([text, " ".join([compiler, *FLAGS]).encode(), openmp.encode()])).hexdigest()
    folder = cache_root() / "cpu"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(folder)
    target = folder / f"{source.stem}-{key[:16]}.so"
    for attempt in (1, 2):
        if not target.exists():
            _compile(compiler, openmp, target, source)
        _private(target)
        try:
            library = ctypes.CDLL(str(target))
            break
        except OSError:  # a damaged file (a full disk, say): build it again, once
            if attempt == 2:
                raise
            target.unlink(missing_ok=True)
    return library


def _build() -> ctypes.CDLL:
    """Compile (or reuse) this kernel's library; raises RuntimeError saying why it cannot."""
    library = build_library(SOURCE)
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
