"""`kernelhub.lock`: the exact kernel files a project runs, checked field by field on read.

One entry per kernel a project uses, its dependencies included: a Hub kernel
`org/name@rev` with its resolved commit, or a local directory (keyed `./path`, relative to
the lock file). Each entry holds, per build variant, the sha256 of every file. Loading
under a lock resolves Hub kernels to the pinned commit (from the cache when it is there,
so no request), then compares every digest before a line of the kernel is imported.

    {"lock_version": 1,
     "kernels": {"my-org/rmsnorm@v1": {"repo_id": "my-org/rmsnorm", "requested": "v1",
                                       "commit": "3f2a...", "variants": {"torch-cpu": {"files": {...}}}},
                 "./kernels/mine": {"path": "kernels/mine", "variants": {"torch-cpu": {"files": {...}}}}}}

A malformed lock is one `LockError` naming the file, the field, what was found and what is
allowed; nothing is loaded from it.

>>> from kernelhub.registry.hub.ref import parse_kernel_ref
>>> lock_key(parse_kernel_ref("my-org/rmsnorm@v1:RMSNorm", "example"))
'my-org/rmsnorm@v1'
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

from kernelhub.declare.errors import KernelhubError, LockError
from kernelhub.declare.json_limits import read_json_file
from kernelhub.registry.hub.ref import HubRef, LocalRef, parse_kernel_ref

LOCK_VERSION = 1
DEFAULT_NAME = "kernelhub.lock"
ENV = "KERNELHUB_LOCK"
MAX_LOCK_BYTES = 16 << 20  # about 100 bytes per locked file: room for thousands of kernels
# fullmatch everywhere: `$` also matches before a trailing newline
_COMMIT = re.compile(r"[0-9a-f]{40}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_VARIANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")



@dataclasses.dataclass(frozen=True)
class LockEntry:
    """One locked kernel: a Hub repo at a commit (`repo_id` set) or a local directory (`path` set)."""

    variants: dict                 # variant name -> {"files": {relpath: sha256}}
    repo_id: str | None = None
    requested: str | None = None
    commit: str | None = None
    path: str | None = None        # local entries: the directory, relative to the lock file

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}" if self.repo_id else f"./{self.path}"

    def verify(self, variant: str, digests: dict[str, str], where) -> None:
        """Raise `LockError` unless `digests` (relpath -> sha256 of what will be imported) are
        exactly the locked files of `variant`."""
        locked = self.variants.get(variant)
        if locked is None:
            raise LockError(f"{self.name}: the lock has no build variant {variant!r} "
                            f"(locked: {', '.join(sorted(self.variants))}). Re-run `kernelhub lock` on this machine")
        expected = locked["files"]
        changed = sorted(f for f in expected if f in digests and digests[f] != expected[f])
        missing = sorted(set(expected) - set(digests))
        extra = sorted(set(digests) - set(expected))
        if changed or missing or extra:
            detail = "; ".join(f"{what}: {', '.join(files)}" for what, files in
                               (("changed", changed), ("missing", missing), ("not in the lock", extra)) if files)
            raise LockError(f"{self.name} ({variant}) does not match the lock, so it was not imported "
                            "(nor anything that needs it). "
                            f"{detail}. Files in {str(where)!r} were modified; delete them and run "
                            "`kernelhub download`, or re-lock if the change is intended")


class KernelLock:
    """A parsed, validated lock file."""

    def __init__(self, entries: dict[str, LockEntry], path: Path | None = None):
        self.entries, self.path = entries, path

    @property
    def base(self) -> Path:
        """The directory local entries are relative to."""
        return (self.path.parent if self.path else Path.cwd()).resolve()

    @classmethod
    def read(cls, path) -> "KernelLock":
        """Parse and check the lock file at `path` (a str or path); nothing else is accepted."""
        if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
            raise LockError(f"lock={path!r} ({type(path).__name__}) is not a lock file; pass a path such as "
                            f"lock=\"{DEFAULT_NAME}\", a KernelLock, or None for ${ENV}")
        path = Path(path)
        where = f"lock file {str(path)!r}"
        try:
            data = read_json_file(path, where, LockError, max_bytes=MAX_LOCK_BYTES)
        except LockError as e:
            if str(e).endswith(" does not exist"):
                raise LockError(f"{e}; create it with `kernelhub lock`") from None
            raise
        return cls(parse_lock(data, str(path)), path)

    @classmethod
    def from_env(cls) -> "KernelLock | None":
        """The lock named by $KERNELHUB_LOCK, if set."""
        path = os.environ.get(ENV)
        return cls.read(path) if path else None

    def key_for(self, ref) -> str:
        """The lock key of a HubRef ('org/name@rev') or LocalRef ('./dir' relative to the lock)."""
        if isinstance(ref, LocalRef):
            return "./" + Path(os.path.relpath(ref.path.resolve(), self.base)).as_posix()
        return lock_key(ref)

    def entry_for(self, ref) -> LockEntry:
        key = self.key_for(ref)
        entry = self.entries.get(key)
        if entry is None:
            raise LockError(f"{key} is not in the lock {str(self.path or '')!r} "
                            f"(locked: {', '.join(sorted(self.entries)) or 'nothing'}). "
                            f"Add it with `kernelhub lock {key}`")
        return entry

    def write(self, path) -> None:
        data = {"lock_version": LOCK_VERSION,
                "kernels": {k: {f: v for f, v in dataclasses.asdict(e).items() if v is not None}
                            for k, e in sorted(self.entries.items())}}
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def lock_key(ref: HubRef) -> str:
    """'org/name@rev', the key of a HubRef in a lock (the symbol is not part of it)."""
    return f"{ref.repo_id}@{ref.requested}"


# -- the schema ------------------------------------------------------------------------

def _bad(file: str, field: str, found, allowed: str) -> LockError:
    return LockError(f"lock file {file!r}: {field} is {found!r} ({type(found).__name__}); expected {allowed}. "
                     "Re-create it with `kernelhub lock`")


def _relpath_ok(rel) -> bool:
    parts = rel.split("/") if isinstance(rel, str) else []
    return bool(parts) and "\\" not in rel and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _variants(raw, file: str, field: str) -> dict:
    if not isinstance(raw, dict) or not raw:
        raise _bad(file, field, raw, "a non-empty object of build variants")
    for variant, body in raw.items():
        where = f"{field}[{variant!r}]"
        if not isinstance(variant, str) or not _VARIANT.fullmatch(variant):
            raise _bad(file, f"{field} key", variant, "a build variant name like 'torch-cpu'")
        if not isinstance(body, dict) or set(body) != {"files"}:
            raise _bad(file, where, body, "an object with exactly one field, 'files'")
        files = body["files"]
        if not isinstance(files, dict) or not files:
            raise _bad(file, f"{where}.files", files, "a non-empty object of relative path -> sha256")
        for rel, digest in files.items():
            if not _relpath_ok(rel):
                raise _bad(file, f"{where}.files key", rel, "a relative path inside the variant (no '..', no '/')")
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                raise _bad(file, f"{where}.files[{rel!r}]", digest, "a sha256 digest: 64 lowercase hex digits")
    return raw


def _hub_entry(key: str, raw: dict, file: str) -> LockEntry:
    field = f"kernels[{key!r}]"
    if set(raw) != {"repo_id", "requested", "commit", "variants"}:
        raise _bad(file, field, sorted(raw), "the fields commit, repo_id, requested, variants")
    try:
        ref = parse_kernel_ref(key, f"lock file {file!r}")
    except KernelhubError as e:
        raise LockError(str(e)) from None
    if not isinstance(ref, HubRef) or ref.symbol:
        raise _bad(file, f"{field} key", key, "'org/name@rev' (no ':Symbol')")
    if raw["repo_id"] != ref.repo_id or raw["requested"] != ref.requested or "@" not in key:
        raise _bad(file, f"{field}.repo_id/requested", f"{raw['repo_id']}@{raw['requested']}",
                   f"to match the key {key!r}")
    if not isinstance(raw["commit"], str) or not _COMMIT.fullmatch(raw["commit"]):
        raise _bad(file, f"{field}.commit", raw["commit"], "a full commit id: 40 lowercase hex digits")
    return LockEntry(_variants(raw["variants"], file, f"{field}.variants"), raw["repo_id"], raw["requested"],
                     raw["commit"])


def _local_entry(key: str, raw: dict, file: str) -> LockEntry:
    field = f"kernels[{key!r}]"
    if set(raw) != {"path", "variants"}:
        raise _bad(file, field, sorted(raw), "the fields path, variants (a local directory)")
    path = raw["path"]
    if not isinstance(path, str) or not path or path.startswith("/") or "./" + Path(path).as_posix() != key:
        raise _bad(file, f"{field}.path", path, f"the directory relative to the lock file, matching the key {key!r}")
    return LockEntry(_variants(raw["variants"], file, f"{field}.variants"), path=path)


def parse_lock(data, file: str) -> dict[str, LockEntry]:
    """Lock key -> LockEntry from a lock file's JSON, or `LockError` for the first wrong field."""
    if not isinstance(data, dict):
        raise _bad(file, "the top level", data, "an object with lock_version and kernels")
    if set(data) != {"lock_version", "kernels"}:
        raise _bad(file, "the top level", sorted(data), "exactly the fields kernels, lock_version")
    if type(data["lock_version"]) is not int or data["lock_version"] != LOCK_VERSION:
        raise _bad(file, "lock_version", data["lock_version"], f"{LOCK_VERSION}")
    kernels = data["kernels"]
    if not isinstance(kernels, dict):
        raise _bad(file, "kernels", kernels, "an object of 'org/name@rev' or './dir' -> entry")
    entries = {}
    for key, raw in kernels.items():
        if not isinstance(raw, dict):
            raise _bad(file, f"kernels[{key!r}]", raw, "an object")
        entries[key] = _local_entry(key, raw, file) if key.startswith("./") else _hub_entry(key, raw, file)
    return entries
