"""Files in the shared Hugging Face cache are checked before they are used, not trusted for being there.

huggingface_hub names each blob after the hash the Hub gave for the file (the git blob id
of a regular file, the sha256 of an LFS file) and links `snapshots/<commit>/<path>` to it.
A blob whose bytes do not have that hash (a download cut short and resumed wrongly, a
server that lied about the size), or a `metadata.json` / `kernelhub.json` that is empty or
not JSON, is damaged. kernelhub removes it (the link and its blob, under huggingface_hub's
own lock for that blob), so the next fetch downloads it again; a damaged file the Hub sends
again is removed again and reported.

Under a lock nothing is removed: the lock comparison refuses what differs, and says so.

>>> git_blob_id(b"") == EMPTY_GIT_BLOB
True
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
from pathlib import Path

from kernelhub.declare.errors import KernelMetadataError
from kernelhub.declare.json_limits import load_json
from kernelhub.registry.hub.snapshot import MAX_FILE_BYTES

JSON_FILES = ("metadata.json", "kernelhub.json")
EMPTY_GIT_BLOB = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # what the Hub names an empty file
MAX_JSON_BYTES = 1 << 20
_SHA1, _SHA256 = re.compile(r"[0-9a-f]{40}"), re.compile(r"[0-9a-f]{64}")

logger = logging.getLogger(__name__)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def repo_cache_dir(repo_id: str) -> Path:
    """`<HF cache>/kernels--org--name`, where `kernels` keeps the repo."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    from kernels.hf_hub import CACHE_DIR

    return Path(CACHE_DIR or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="kernel")


def _blob(path: Path) -> Path | None:
    """The blob a snapshot link points to, when it is one of its own repo's blobs."""
    if not path.is_symlink():
        return None
    repo = next((p for p in path.parents if p.name.startswith("kernels--")), None)
    target = Path(os.path.realpath(path))
    return target if repo is not None and target.parent == Path(os.path.realpath(repo / "blobs")) else None


def _problem(path: Path) -> str | None:
    """Why the cached file `path` (a link into blobs/, or a plain file) is damaged; None if it is not.

    Anything else (a link elsewhere, a FIFO, a file over the size cap) is left for the variant
    reader to refuse with its reason."""
    blob = _blob(path)
    if path.is_symlink() and blob is None:
        return None
    try:
        st = path.stat()
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE_BYTES:
        return None
    size, name = st.st_size, blob.name if blob is not None else ""
    if path.name in JSON_FILES:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
        if not data.strip():
            return "is empty"
        try:
            load_json(data, path.name, KernelMetadataError, max_bytes=MAX_JSON_BYTES)
        except KernelMetadataError as e:
            return str(e)
    if _SHA1.fullmatch(name) or _SHA256.fullmatch(name):
        digest = hashlib.sha1(b"blob %d\0" % size) if len(name) == 40 else hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != name:
            return f"does not match the hash the Hub gave for it ({name[:12]}..., {size} bytes held)"
    return None


def damaged(paths) -> dict[Path, str]:
    """path -> why, for the cached files among `paths` that are damaged."""
    found = {}
    for path in paths:
        why = _problem(Path(path))
        if why is not None:
            found[Path(path)] = why
    return found


def damaged_variant(variant_path: Path) -> dict[Path, str]:
    """The damaged files of one cached variant directory (links to folders are not followed:
    the variant reader refuses them)."""
    return damaged(Path(folder) / name for folder, _, names in os.walk(variant_path) for name in names)


def damaged_metadata(repo_id: str) -> dict[Path, str]:
    """The damaged metadata.json / kernelhub.json of every cached variant of `repo_id`
    (what `kernels` reads before kernelhub sees a path)."""
    snapshots = repo_cache_dir(repo_id) / "snapshots"
    return damaged(p for name in JSON_FILES for p in snapshots.glob(f"*/build/*/{name}"))


def drop(found: dict[Path, str]) -> list[str]:
    """Remove damaged cached files (link and blob, under huggingface_hub's lock); one line each."""
    from huggingface_hub.utils import WeakFileLock

    lines = []
    for path, why in found.items():
        blob = _blob(path)
        lock = blob.parents[2] / ".locks" / blob.parents[1].name / f"{blob.name}.lock" if blob else None
        if lock is not None:
            lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock) if lock is not None else contextlib.nullcontext():
            for victim in (path, blob, blob.with_name(blob.name + ".incomplete") if blob else None):
                if victim is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(victim)
        rel = "/".join(path.parts[-3:])
        logger.warning("removed %s from the Hugging Face cache: it %s", path, why)
        lines.append(f"{rel} {why}")
    return lines
