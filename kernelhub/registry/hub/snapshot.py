"""Reading a kernel build variant exactly once: every byte that may run, hashed as it is read.

A variant may hold only real directories and regular files. Symlinks (to files or
directories), bytecode (`.pyc`, `__pycache__`) and anything else (fifos, sockets) are
refused, locked or not: Hub kernels never ship them, and each is a way to run bytes that a
digest of the sources does not cover. The one exception is how the Hugging Face cache
stores files: inside `snapshots/<commit>/`, each file is a symlink to a blob of the same
repo, which is followed (its bytes are what is hashed).

Every path is opened relative to the directory above it (`dir_fd`), with `O_NOFOLLOW`, from
`top` down: the kernel directory the user named, or the repo folder of the HF cache. A
symlink anywhere below `top` (a `build/` that is a link, a variant directory swapped for
one while a bind runs) is refused with its location; once a directory is open, renaming
or swapping its path changes nothing that is read. Each file is at most
`MAX_FILE_BYTES`, checked with `fstat` before it is read.

The `Snapshot` keeps the bytes it hashed, so what is imported later is what was verified,
whatever happens to the directory afterwards.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> _ = (root / "metadata.json").write_text("{}")
>>> sorted(read_variant(root).digests)
['metadata.json']
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import logging
import os
import posixpath
import stat
from pathlib import Path

from kernelhub.declare.errors import UnsafeKernelError
from kernelhub.declare.json_limits import human_size

BYTECODE_SUFFIXES = (".pyc", ".pyo")
MAX_FILE_BYTES = 2 << 30  # the largest kernel file read (and hashed in memory): a CUDA extension
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)

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


def hub_repo_dir(variant_path: Path) -> Path | None:
    """`<repo>` when `variant_path` is `<repo>/snapshots/<commit>/build/<variant>` of the HF cache."""
    parts = Path(variant_path).parts
    if len(parts) >= 5 and parts[-4] == "snapshots" and parts[-2] == "build":
        return Path(variant_path).parents[3]
    return None


def _refuse(root: Path, rel: str, why: str) -> UnsafeKernelError:
    return UnsafeKernelError(f"kernel variant {str(root)!r} holds {rel!r}, {why}, so none of it was imported. "
                             "Hub kernels never ship symlinks or bytecode: delete the directory (for a Hub "
                             "kernel, its snapshot in the cache) and download or build it again")


def _refuse_parent(top: Path, rel: str, e: OSError) -> UnsafeKernelError:
    where = str(top / rel)
    if os.path.islink(where):
        why = f"is a symlink (to {os.readlink(where)!r})"
    elif e.errno in (errno.ELOOP, errno.ENOTDIR):  # O_NOFOLLOW met a link (since replaced), or a file
        why = "is a symlink or not a directory"
    else:
        why = f"cannot be opened ({e.strerror})"
    return UnsafeKernelError(f"kernel directory {str(top)!r}: {rel!r} {why}, so none of it was imported. "
                             "Kernel files are read through real directories only: replace the link with the "
                             "directory it points to")


def read_variant(root, *, top=None) -> Snapshot:
    """Read every file under `root`; `UnsafeKernelError` for a symlink (below `top`, default
    `root` itself), bytecode, a special file or a file over `MAX_FILE_BYTES`.

    In the HF cache (`top` is the repo folder, `root` under `snapshots/`), file symlinks into
    the repo's own `blobs/` are followed.
    """
    root = Path(root)
    top = Path(top) if top is not None else root
    rel_parts = root.relative_to(top).parts
    if ".." in rel_parts:
        raise _refuse(root.parent, root.name, "which is outside the kernel directory")
    with contextlib.ExitStack() as fds:
        def opened(fd):
            fds.callback(os.close, fd)
            return fd
        try:
            fd = opened(os.open(top, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0)
                                | (os.O_NOFOLLOW if not rel_parts else 0)))
        except OSError as e:
            raise _refuse(top.parent, top.name, f"which is a symlink or not a directory ({e.strerror})") from None
        top_fd = fd
        for i, part in enumerate(rel_parts):
            try:
                fd = opened(os.open(part, _DIR, dir_fd=fd))
            except OSError as e:
                raise _refuse_parent(top, "/".join(rel_parts[:i + 1]), e) from None
        blobs = _Blobs(top, top_fd, opened) if rel_parts[:1] == ("snapshots",) else None
        files = _read_tree(root, fd, opened, blobs, "/".join(rel_parts))
    # No bar: a variant is a few small files, read on every bind; the total says what was hashed.
    logger.debug("read kernel variant %s: %d files, %d bytes", root, len(files), sum(map(len, files.values())))
    return Snapshot(root, dict(sorted(files.items())))


def _read_tree(root: Path, root_fd: int, opened, blobs, from_top: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    pending = [(root_fd, "")]
    while pending:
        dir_fd, prefix = pending.pop()
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.name == "__pycache__" or entry.name.endswith(BYTECODE_SUFFIXES):
                    raise _refuse(root, rel, "which is Python bytecode (it would run instead of the hashed source)")
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    try:
                        pending.append((opened(os.open(entry.name, _DIR, dir_fd=dir_fd)), rel + "/"))
                    except OSError as e:  # swapped for a link since it was listed
                        raise _refuse(root, rel, f"which is a symlink or not a directory ({e.strerror})") from None
                elif stat.S_ISREG(mode):
                    files[rel] = _read_regular(root, rel, entry.name, dir_fd)
                elif stat.S_ISLNK(mode):
                    target = os.readlink(entry.name, dir_fd=dir_fd)
                    if blobs is None:
                        shown = os.path.normpath(os.path.join(root, os.path.dirname(rel), target))
                        raise _refuse(root, rel, f"which is a symlink to {shown!r}")
                    files[rel] = blobs.read(root, rel, posixpath.join(from_top, rel), target)
                else:
                    raise _refuse(root, rel, "which is not a regular file")
    return files


def _read_regular(root: Path, rel: str, name: str, dir_fd: int) -> bytes:
    """The bytes of the regular file `name` in `dir_fd`, refusing a link, a fifo or an oversize file."""
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError as e:
        raise _refuse(root, rel, f"which cannot be opened as a plain file ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(root, rel, "which is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise _refuse(root, rel, f"which is {st.st_size} bytes, over the {human_size(MAX_FILE_BYTES)} "
                                     "limit for one kernel file")
        data = f.read(st.st_size + 1)
    if len(data) > st.st_size:
        raise _refuse(root, rel, "which grew while it was read")
    return data


class _Blobs:
    """The HF cache's `blobs/` folder of one repo, opened once from the repo folder."""

    def __init__(self, top: Path, top_fd: int, opened):
        self.top, self.top_fd, self.opened, self.fd = top, top_fd, opened, None

    def read(self, root: Path, rel: str, link_from_top: str, target: str) -> bytes:
        # The link must name <repo>/blobs/<name>: relative to the link (as huggingface_hub writes
        # it) or absolute. Its text is only compared; the blob is opened from the blobs folder.
        if os.path.isabs(target):  # against the repo folder as named, or as resolved
            tries = (os.path.relpath(os.path.normpath(target), t) for t in (self.top, os.path.realpath(self.top)))
            resolved = next((r for r in tries if r.startswith("blobs/")), os.path.normpath(target))
        else:
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(link_from_top), target))
        folder, _, name = resolved.partition("/")
        if folder != "blobs" or not name or "/" in name or name in (".", ".."):
            shown = os.path.normpath(os.path.join(self.top, resolved))
            raise _refuse(root, rel, f"which is a symlink to {shown!r}")
        if self.fd is None:
            try:
                self.fd = self.opened(os.open("blobs", _DIR, dir_fd=self.top_fd))
            except OSError as e:
                raise _refuse_parent(self.top, "blobs", e) from None
        return _read_regular(root, rel, name, self.fd)
