"""`kernelhub.lock`: the exact Hub kernel files a project runs, verified before import.

One entry per `org/name@rev` a project uses: the resolved commit and, per build variant,
the sha256 of every file. Loading with a lock resolves to the pinned commit (from the
local cache when it is there, so no network request), then compares every digest before
a line of the kernel is imported. A changed, missing or extra file is refused.

    {"lock_version": 1,
     "kernels": {"my-org/rmsnorm@v1": {"repo_id": "my-org/rmsnorm", "requested": "v1",
                                       "commit": "3f2a...", "variants": {"torch-cpu": {"files": {...}}}}}}

>>> from kernelhub.registry.hub_ref import parse_kernel_ref
>>> lock_key(parse_kernel_ref("my-org/rmsnorm@v1:RMSNorm", "example"))
'my-org/rmsnorm@v1'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from kernelhub.registry.errors import KernelhubError

LOCK_VERSION = 1
DEFAULT_NAME = "kernelhub.lock"
ENV = "KERNELHUB_LOCK"


class LockError(KernelhubError):
    """A lock file that cannot be read, misses a kernel, or does not match the files on disk."""


def file_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` (bytecode caches excluded), keyed by relative path."""
    root = Path(root)
    digests = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if "__pycache__" in path.parts or path.suffix == ".pyc" or not path.is_file():
            continue
        digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@dataclasses.dataclass(frozen=True)
class LockEntry:
    repo_id: str
    requested: str
    commit: str
    variants: dict  # variant name -> {"files": {relpath: sha256}}

    def verify(self, variant: str, variant_path: Path) -> None:
        """Raise `LockError` unless `variant_path` holds exactly the locked files."""
        locked = self.variants.get(variant)
        if locked is None:
            raise LockError(f"{self.repo_id}@{self.requested}: the lock has no build variant {variant!r} "
                            f"(locked: {', '.join(sorted(self.variants)) or 'none'}). Re-run `kernelhub lock` "
                            f"with --backend for this machine")
        expected, actual = locked["files"], file_digests(variant_path)
        changed = sorted(f for f in expected if f in actual and actual[f] != expected[f])
        missing = sorted(set(expected) - set(actual))
        extra = sorted(set(actual) - set(expected))
        if changed or missing or extra:
            detail = "; ".join(f"{what}: {', '.join(files)}" for what, files in
                               (("changed", changed), ("missing", missing), ("not in the lock", extra)) if files)
            raise LockError(f"{self.repo_id}@{self.commit[:12]} ({variant}) does not match the lock, so it was not "
                            f"imported. {detail}. Files in {str(variant_path)!r} were modified; delete that "
                            f"snapshot and run `kernelhub download`, or re-lock if the change is intended")


class KernelLock:
    """A parsed lock file."""

    def __init__(self, entries: dict[str, LockEntry], path: Path | None = None):
        self.entries, self.path = entries, path

    @classmethod
    def read(cls, path) -> "KernelLock":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LockError(f"lock file {str(path)!r} does not exist; create it with `kernelhub lock`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LockError(f"lock file {str(path)!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION:
            raise LockError(f"lock file {str(path)!r} has lock_version {data.get('lock_version')!r} "
                            f"(expected {LOCK_VERSION}); re-create it with `kernelhub lock`")
        try:
            entries = {key: LockEntry(**value) for key, value in data["kernels"].items()}
        except (KeyError, TypeError) as e:
            raise LockError(f"lock file {str(path)!r} is malformed ({e}); re-create it with `kernelhub lock`") from None
        return cls(entries, path)

    @classmethod
    def from_env(cls) -> "KernelLock | None":
        """The lock named by $KERNELHUB_LOCK, if set."""
        path = os.environ.get(ENV)
        return cls.read(path) if path else None

    def entry_for(self, ref) -> LockEntry:
        entry = self.entries.get(lock_key(ref))
        if entry is None:
            raise LockError(f"{lock_key(ref)} is not in the lock {str(self.path or '')!r} "
                            f"(locked: {', '.join(sorted(self.entries)) or 'nothing'}). "
                            f"Add it with `kernelhub lock {lock_key(ref)}`")
        return entry

    def write(self, path) -> None:
        data = {"lock_version": LOCK_VERSION,
                "kernels": {k: dataclasses.asdict(e) for k, e in sorted(self.entries.items())}}
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def lock_key(ref) -> str:
    """'org/name@rev', the key of a HubRef in a lock (the symbol is not part of it)."""
    return f"{ref.repo_id}@{ref.requested}"
