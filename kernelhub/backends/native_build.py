"""Building kernelhub's own C and C++ CPU kernels on first use, with the system compiler.

The sources ship with kernelhub (`skinny_linear.c`, `gguf_quant.c`, `gguf_ops.cpp`). Each is
compiled once into `cpu/` under kernelhub's cache directory (`$KERNELHUB_CACHE`, else
`$XDG_CACHE_HOME/kernelhub` or `~/.cache/kernelhub`), keyed by a hash of its text (and of the
headers it includes), the compiler's name, the flags, what it links, torch's version and its OpenMP
runtime, so an edited source, another compiler or another torch builds anew. The directory and the library
must be private to the user (owned, not writable by others), or they are refused: a library
loaded from a place another user can write to would run their code.

C sources link the OpenMP runtime torch loaded, so that the kernels' threads are torch's. C++
sources (a `.cpp` file) are torch operators written against torch's stable C ABI
(`torch/csrc/stable`), which needs only torch's headers and compiles in about a second;
`torch_link_flags()` gives what they link.

    >>> library = build_library(Path("kernelhub/backends/skinny_linear.c"))   # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from kernelhub.declare.cache_dir import cache_root

C_FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-fopenmp", "-std=gnu11")
CXX_FLAGS = ("-O2", "-fPIC", "-std=c++17")
TORCH = Path(torch.__file__).parent


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


def torch_link_flags() -> tuple[str, ...]:
    """What a C++ torch operator links: torch's CPU library and c10, found at run time where they are."""
    lib = str(TORCH / "lib")
    return (f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}")


def _private(path: Path) -> None:
    """Refuse `path` unless this user owns it and no one else may write to it."""
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise RuntimeError(f"{str(path)!r} is not private to this user (owner uid {info.st_uid}, mode "
                           f"{info.st_mode & 0o777:o}); remove it or point KERNELHUB_CACHE elsewhere")


def _compile(compiler: str, flags: tuple[str, ...], link: tuple[str, ...], target: Path, source: Path) -> None:
    """Build the library of `source` into `target`, in a private temporary directory beside it."""
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        obj, lib = work / f"{source.stem}.o", work / target.name
        steps = [[compiler, *flags, "-c", str(source), "-o", str(obj)],
                 [compiler, "-shared", str(obj), *link, "-o", str(lib)]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(step[:2])} ... failed: {done.stderr.strip()[-500:]}")
        os.chmod(lib, 0o755)
        os.replace(lib, target)  # atomic: a process building the same key at once is harmless
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_library(source: Path, extra_flags: tuple[str, ...] = (), headers: tuple[Path, ...] = (),
                  link: tuple[str, ...] = ()) -> Path:
    """Compile (or reuse) the shared library of `source` (C, or C++ for a `.cpp` file), cached as
    `cpu/<stem>-<key>.so`, and return its path; raises RuntimeError saying why it cannot.
    `extra_flags` come after the language's flags (an instruction set, say), `headers` are the files
    it includes (their text is part of the key), `link` what it links besides (a C library links
    torch's OpenMP runtime by file: its soname is what the loader finds already loaded)."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.exists("/proc/self/maps"):
        raise RuntimeError(f"it is written for x86-64 Linux, not {platform.system()} {platform.machine()}")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        raise RuntimeError(f"it needs AVX2 and FMA; torch reports this CPU as {capability}")
    cxx = source.suffix == ".cpp"
    compiler = (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") if cxx else
                os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
    if compiler is None:
        raise RuntimeError(f"no {'C++' if cxx else 'C'} compiler found (set {'CXX' if cxx else 'CC'}, or install "
                           f"{'g++' if cxx else 'gcc'})")
    if cxx:
        flags = (*CXX_FLAGS, f"-I{TORCH / 'include'}", *extra_flags)
    else:
        openmp = torch_openmp()
        if openmp is None:
            raise RuntimeError("torch's OpenMP runtime (libgomp) is not loaded in this process")
        flags, link = (*C_FLAGS, *extra_flags), (*link, openmp)
    texts = [source.read_bytes(), *(h.read_bytes() for h in headers)]
    key = hashlib.sha256(b"\0".join([*texts, " ".join([compiler, *flags]).encode(), " ".join(link).encode(),
                                     torch.__version__.encode()]))
    folder = cache_root() / "cpu"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private(folder)
    target = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        _compile(compiler, flags, link, target, source)
    _private(target)
    return target


def load_library(source: Path, *args, loader=ctypes.CDLL, **kwargs):
    """`loader` (ctypes.CDLL, or torch.ops.load_library for an operator library) of the path of
    `build_library(source, ...)`; a file that fails to load (damaged by a full disk, say) is built
    again, once."""
    target = build_library(source, *args, **kwargs)
    try:
        return loader(str(target))
    except OSError:
        target.unlink(missing_ok=True)
        return loader(str(build_library(source, *args, **kwargs)))
