"""Reading a kernel build variant exactly once: every byte that may run, hashed as it is read.

A variant may hold only real directories and regular files. Symlinks (to files or
directories), bytecode (`.pyc`, `__pycache__`) and anything else (fifos, sockets) are
refused, locked or not: Hub kernels never ship them, and each is a way to run bytes that a
digest of the sources does not cover. The one exception is how the Hugging Face cache
stores files: inside `snapshots/<commit>/`, each file is a symlink to a blob of the same
repo, which is followed (its bytes are what is hashed).

The `Snapshot` keeps the bytes it hashed, so what is imported later is what was verified,
whatever happens to the directory afterwards.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> _ = (root / "metadata.json").write_text("{}")
>>> sorted(read_variant(root).digests)
['metadata.json']
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import stat
from pathlib import Path

from kernelhub.declare.errors import UnsafeKernelError

BYTECODE_SUFFIXES = (".pyc", ".pyo")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The files of one build variant: relative path -> bytes, read once."""

    root: Path
    files: dict

    @functools.cached_property
    def digests(self) -> dict[str, str]:
        return {rel: hashlib.sha256(data).hexdigest() for rel, data in self.files.items()}

    @functools.cached_property
    def content_key(self) -> str:
        """A sha256 over every path and digest: equal keys, equal bytes."""
        manifest = "".join(f"{rel}\0{digest}\n" for rel, digest in sorted(self.digests.items()))
        return hashlib.sha256(manifest.encode()).hexdigest()


def hub_blobs_dir(variant_path: Path) -> Path | None:
    """`<repo>/blobs` when `variant_path` is `<repo>/snapshots/<commit>/build/<variant>` of the HF cache."""
    parts = Path(variant_path).parts
    if len(parts) >= 4 and parts[-4] == "snapshots" and parts[-2] == "build":
        return Path(variant_path).parents[3] / "blobs"
    return None


def _refuse(root: Path, rel: str, why: str) -> UnsafeKernelError:
    return UnsafeKernelError(f"kernel variant {str(root)!r} holds {rel!r}, {why}, so none of it was imported. "
                             "Hub kernels never ship symlinks or bytecode: delete the directory (for a Hub "
                             "kernel, its snapshot in the cache) and download or build it again")


def read_variant(root, *, blobs: Path | None = None) -> Snapshot:
    """Read every file under `root`; `UnsafeKernelError` for a symlink, bytecode or a special file.

    `blobs`: the HF cache's blob directory, whose files the snapshot's file symlinks may
    point at (see `hub_blobs_dir`).
    """
    root = Path(root)
    if root.is_symlink() or not root.is_dir():
        raise _refuse(root.parent, root.name, "which is a symlink or not a directory")
    blobs = blobs.resolve() if blobs is not None else None
    files: dict[str, bytes] = {}
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.name == "__pycache__" or entry.name.endswith(BYTECODE_SUFFIXES):
                    raise _refuse(root, rel, "which is Python bytecode (it would run instead of the hashed source)")
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    pending.append((Path(entry.path), rel + "/"))
                elif stat.S_ISREG(mode):
                    files[rel] = _read_regular(root, rel, entry.path)
                elif stat.S_ISLNK(mode):
                    files[rel] = _read_blob_link(root, rel, Path(entry.path), blobs)
                else:
                    raise _refuse(root, rel, "which is not a regular file")
    # No bar: a variant is a few small files, read on every bind; the total says what was hashed.
    logger.debug("read kernel variant %s: %d files, %d bytes", root, len(files), sum(map(len, files.values())))
    return Snapshot(root, dict(sorted(files.items())))


def _read_regular(root: Path, rel: str, path) -> bytes:
    """The bytes of a regular file, refusing one swapped for a link or a fifo since it was listed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise _refuse(root, rel, f"which cannot be opened as a plain file ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise _refuse(root, rel, "which is not a regular file")
        return f.read()


def _read_blob_link(root: Path, rel: str, link: Path, blobs: Path | None) -> bytes:
    target = Path(os.path.realpath(link))
    if blobs is None or target.parent != blobs:
        raise _refuse(root, rel, f"which is a symlink to {str(target)!r}")
    return _read_regular(root, rel, target)
