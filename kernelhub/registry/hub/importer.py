"""Importing a verified kernel variant: the bytes that run are the bytes that were hashed.

Python modules of the kernel are compiled from the `Snapshot`'s bytes in memory, never
from the file system and never through a bytecode cache (none is read or written).
Extension modules (`.so`) and data files are used from kernelhub's private verified copy
(`store.verified_copy`), so `__file__` and relative resources work as usual.

Each variant gets its own module name, `_kernelhub_<name>_<closure key>` (a sha256 over its
bytes and its dependencies' keys), so two kernels never collide in `sys.modules` and the
same closure is imported once per process. Every module name under a kernel is answered by
kernelhub's finder: a name that is not in the verified bytes is not found, rather than
looked up on disk.

>>> import tempfile, pathlib
>>> from kernelhub.registry.hub.snapshot import Snapshot
>>> snap = Snapshot(pathlib.Path("demo"), {"demo/__init__.py": b"ANSWER = 42\\n"})
>>> import_variant(snap, "demo", pathlib.Path(tempfile.mkdtemp()), {}).ANSWER
42
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

from kernelhub.registry.hub.snapshot import Snapshot

_EXTENSIONS = tuple(importlib.machinery.EXTENSION_SUFFIXES)


class _SourceLoader(importlib.abc.Loader):
    """Executes one module from source bytes already verified."""

    def __init__(self, source: bytes, path: Path):
        self.source, self.path = source, path

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        exec(compile(self.source, str(self.path), "exec", dont_inherit=True), module.__dict__)

    def get_source(self, fullname):  # for tracebacks, inspect and Triton's @jit
        return self.source.decode("utf-8")


class _VerifiedFinder(importlib.abc.MetaPathFinder):
    """Answers for the module names of verified kernels only; everything else passes by."""

    def __init__(self):
        self.kernels: dict[str, tuple[Snapshot, str, Path]] = {}  # module name -> (snapshot, package dir, copy)

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in self.kernels:
            return None
        snapshot, package, copy = self.kernels[top]
        parts = [p for p in (package, *fullname.split(".")[1:]) if p]
        # Every name under a verified kernel is answered here: returning None would let
        # Python's PathFinder look on disk, where nothing was verified.
        spec = self._spec(fullname, snapshot, parts, copy)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {fullname!r} in the verified kernel {str(snapshot.root)!r}",
                                      name=fullname)
        return spec

    @staticmethod
    def _spec(fullname, snapshot, parts, copy):
        rel = "/".join(parts)
        candidates = [("/".join([*parts, "__init__.py"]), True)] + ([(rel + ".py", False)] if parts else [])
        for candidate, is_package in candidates:
            if candidate in snapshot.files:
                loader = _SourceLoader(snapshot.files[candidate], copy / candidate)
                spec = importlib.util.spec_from_loader(fullname, loader, origin=str(copy / candidate),
                                                       is_package=is_package)
                spec.has_location = True
                if is_package:
                    spec.submodule_search_locations = []  # submodules come from this finder only
                return spec
        for suffix in _EXTENSIONS:
            if rel + suffix in snapshot.files:
                location = str(copy / (rel + suffix))
                return importlib.util.spec_from_file_location(
                    fullname, location, loader=importlib.machinery.ExtensionFileLoader(fullname, location))
        return None


_FINDER = _VerifiedFinder()
_INSTALL = threading.Lock()


def module_name(python_name: str, key: str) -> str:
    return f"_kernelhub_{python_name}_{key}"


def import_variant(snapshot: Snapshot, python_name: str, copy: Path, deps: dict[str, ModuleType],
                   key: str | None = None) -> ModuleType:
    """Import the kernel package in `snapshot` (at the variant's top or in `<python_name>/`).

    `copy` is the verified copy of the same bytes; `deps` maps the repo ids of the kernel's
    dependencies to their imported modules (what `kernels.get_kernel_dep` returns inside it).
    `key` names the module: it must change whenever the bytes or the dependencies do
    (default: the snapshot's content key, for a kernel without dependencies).
    """
    from kernels.deps import use_kernel_deps

    name = module_name(python_name, key or snapshot.content_key)
    if name in sys.modules:
        return sys.modules[name]
    package = "" if "__init__.py" in snapshot.files else python_name
    if f"{python_name}/__init__.py" not in snapshot.files and not package == "":
        raise ImportError(f"no kernel package in {str(snapshot.root)!r}: expected __init__.py or "
                          f"{python_name}/__init__.py")
    with _INSTALL:
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        _FINDER.kernels[name] = (snapshot, package, Path(copy))
    try:
        with use_kernel_deps(deps):
            return importlib.import_module(name)
    except BaseException:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[loaded]  # a retry imports from scratch
        raise


def forget_imports() -> None:
    """Drop every kernel this module imported from `sys.modules` (the loader's `forget_loaded`)."""
    with _INSTALL:
        for name in list(_FINDER.kernels):
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
        _FINDER.kernels.clear()
