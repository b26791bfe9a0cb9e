"""kernelhub's private store of verified kernel variants, addressed by content, written once.

Kernel code is never imported from the shared Hugging Face cache (another process may
write there between our check and the import) nor from a local directory as it is now.
A verified `Snapshot` is written to `<cache>/verified/<content key>/`, made read-only, and
imported from there; a copy found there is re-read and compared before it is reused.
Bytecode is never written next to it (kernelhub imports sources itself, see `importer`).

    <cache>/verified/3f2a.../rmsnorm/__init__.py

where <cache> is kernelhub's cache directory (`kernelhub.declare.cache_dir.cache_root`:
$KERNELHUB_CACHE, else $XDG_CACHE_HOME/kernelhub, else ~/.cache/kernelhub).

Many processes fill one store at once, so a copy is published whole (written to a private
temporary folder, then renamed into place: another process sees all of it or nothing), and
once published it is never rewritten or deleted: another process may be importing from it.
A copy found damaged is left where it is and a fresh one is published under the next free
name (`<key>.1`, `<key>.2`, ...).

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

MAX_DAMAGED = 16  # damaged copies of one content key before kernelhub stops and says so


def verified_copy(snapshot: Snapshot) -> Path:
    """A read-only directory holding exactly `snapshot`'s bytes: the first intact copy under
    its content key, else one published now."""
    store = cache_root() / "verified"
    store.mkdir(parents=True, exist_ok=True)
    key = snapshot.content_key
    for n in range(MAX_DAMAGED + 1):
        final = store / (key if n == 0 else f"{key}.{n}")
        if not os.path.lexists(final) and _publish(store, final, snapshot):
            return final
        if _holds(final, snapshot):  # published by us, by another process just now, or earlier
            return final
    raise UnsafeKernelError(f"kernelhub's verified store {str(store)!r} holds {MAX_DAMAGED + 1} damaged copies of "
                            f"{key[:12]}; something keeps writing there. Delete {str(store)!r} while no kernelhub "
                            "process runs")


def _publish(store: Path, final: Path, snapshot: Snapshot) -> bool:
    """Write `snapshot` to a private folder and rename it to `final`; False when another
    process published there first (its copy is then checked like any other)."""
    tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store))
    for rel, data in snapshot.files.items():
        target = tmp / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    _make_read_only(tmp)
    try:
        os.rename(tmp, final)  # atomic; fails when `final` exists and is not an empty directory
        return True
    except OSError:
        _discard(tmp)  # our own, never published: nobody else can be using it
        return False


def _holds(path: Path, snapshot: Snapshot) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    try:
        return read_variant(path).digests == snapshot.digests
    except (UnsafeKernelError, OSError):  # a planted .pyc or symlink, or unreadable: not this content
        return False


def _make_read_only(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(directory, name), stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    for directory, _, _ in os.walk(root, topdown=False):
        os.chmod(directory, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def _discard(path: Path) -> None:
    for directory, _, _ in os.walk(path):
        os.chmod(directory, stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)
