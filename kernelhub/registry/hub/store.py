"""kernelhub's private store of verified kernel variants, addressed by content.

Kernel code is never imported from the shared Hugging Face cache (another process may
write there between our check and the import) nor from a local directory as it is now.
A verified `Snapshot` is written to `<cache>/verified/<content key>/`, made read-only, and
imported from there; a copy found there is re-read and compared before it is reused.
Bytecode is never written next to it (kernelhub imports sources itself, see `importer`).

    <cache>/verified/3f2a.../rmsnorm/__init__.py

where <cache> is kernelhub's cache directory (`kernelhub.declare.cache_dir.cache_root`:
$KERNELHUB_CACHE, else $XDG_CACHE_HOME/kernelhub, else ~/.cache/kernelhub).

>>> import os, pathlib, tempfile; os.environ["KERNELHUB_CACHE"] = tempfile.mkdtemp()
>>> from kernelhub.registry.hub.snapshot import Snapshot
>>> path = verified_copy(Snapshot(pathlib.Path("demo"), {"metadata.json": b"{}"}))
>>> (path / "metadata.json").read_bytes()
b'{}'
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

from kernelhub.declare.cache_dir import cache_root
from kernelhub.registry.hub.snapshot import Snapshot, UnsafeKernelError, read_variant


def verified_copy(snapshot: Snapshot) -> Path:
    """A read-only directory holding exactly `snapshot`'s bytes; reused when it still does."""
    store = cache_root() / "verified"
    store.mkdir(parents=True, exist_ok=True)
    final = store / snapshot.content_key
    if _holds(final, snapshot):
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store))
    for rel, data in snapshot.files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    _make_read_only(tmp)
    if final.exists():  # stale or tampered with: set it aside before taking its place
        _discard(final)
    try:
        os.rename(tmp, final)
    except OSError:  # another thread or process stored the same content first
        _discard(tmp)
        if not _holds(final, snapshot):
            raise UnsafeKernelError(f"the verified copy {str(final)!r} changed while it was being stored; "
                                    "another process is writing to kernelhub's cache") from None
    return final


def _holds(path: Path, snapshot: Snapshot) -> bool:
    if not path.is_dir():
        return False
    try:
        return read_variant(path).digests == snapshot.digests
    except UnsafeKernelError:  # a planted .pyc or symlink: the copy is discarded and rewritten
        return False


def _make_read_only(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(directory, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for directory, _, _ in os.walk(root, topdown=False):
        os.chmod(directory, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def _discard(path: Path) -> None:
    aside = path.with_name(f".discard-{path.name}-{os.getpid()}-{id(path)}")
    try:
        os.rename(path, aside)
    except OSError:
        return
    for directory, _, _ in os.walk(aside):
        os.chmod(directory, stat.S_IRWXU)
    shutil.rmtree(aside, ignore_errors=True)

