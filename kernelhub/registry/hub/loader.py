"""Loading a kernel and its dependencies: trust, fetch, verify, then import, in that order.

For a Hub ref or a local directory, and then for every kernel in its dependency closure
(`kernel-depends` in metadata.json, transitively):

1. trust: a Hub repo off the allowlist is refused before any request (`trust`);
2. fetch: offline-first through `kernels`, bounded by the bind's deadline (`fetch`);
3. read: every file of the variant is read once and hashed; symlinks and bytecode are
   refused (`snapshot`); under a lock, the digests must be exactly the locked ones;
4. only when the whole closure passed: import, dependencies first, from the verified bytes
   and kernelhub's private copy (`importer`, `store`).

Each kernel of the closure is fetched, read and checked once per bind, however many kernels
depend on it; chains are at most `depends.MAX_DEPTH` long. The time it took is the plan's
note for a Hub attention function (`LoadedKernel.note`) and is logged.

One import per kernel per process, however it is spelled (a local directory is known by
its real path, a Hub kernel by repo and commit) and however many threads bind at once. No
process-wide lock is held while fetching.

>>> kernels_backend(torch.device("cpu"))
'cpu'
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import logging
import re
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

from kernelhub.declare.json_limits import read_capped
from kernelhub.registry.hub.depends import check_edge
from kernelhub.registry.hub.fetch import (HubKernelError, bind_memo, current_budget, explain_failure, fetch_variant,
                                          hub_budget, offline, probe)
from kernelhub.registry.hub.importer import forget_imports, import_variant
from kernelhub.registry.hub.lockfile import KernelLock, LockEntry, lock_key
from kernelhub.registry.hub.metadata import (MAX_JSON_BYTES, METADATA, KernelMetadataError, VariantMetadata,
                                             attention_specs, check_json_files, check_with_kernels,
                                             read_kernel_metadata, read_variant_metadata)
from kernelhub.registry.hub.ref import HubRef, LocalRef
from kernelhub.registry.hub.snapshot import Snapshot, hub_repo_dir, read_variant
from kernelhub.registry.hub.store import verified_copy
from kernelhub.registry.hub.trust import check_trusted

_COMMIT = re.compile(r"[0-9a-f]{40}")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Verified:
    """One kernel of a closure, read and checked, not yet imported."""

    ref: HubRef | LocalRef
    label: str                 # 'org/name@v1' or the directory, for messages
    source: str                # 'hub org/name@<commit>' or 'local <dir>', for the plan
    identity: tuple            # ('hub', repo, commit, variant) or ('local', real path, variant)
    snapshot: Snapshot
    meta: VariantMetadata
    declared: dict             # kernelhub.json, checked
    deps: tuple["Verified", ...]

    @property
    def variant(self) -> str:
        return self.snapshot.root.name

    @functools.cached_property
    def closure_key(self) -> str:
        """A sha256 over this kernel's bytes and its dependencies' closure keys."""
        parts = [self.snapshot.content_key, *(f"{d.ref.repo_id}={d.closure_key}" for d in self.deps)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def walk(self):
        """This kernel and every kernel of its closure, each once (a graph, not a tree)."""
        seen, pending = set(), [self]
        while pending:
            node = pending.pop()
            if id(node) not in seen:
                seen.add(id(node))
                yield node
                pending.extend(reversed(node.deps))


@dataclasses.dataclass(frozen=True)
class LoadedKernel:
    """An imported kernel and where exactly it came from."""

    module: ModuleType
    source: str          # "hub org/name@<commit>" or "local <dir>"
    metadata: dict       # the kernel's kernelhub.json ({} without one)
    attention: dict      # symbol -> AttentionSpec, parsed from `metadata` before import
    closure: Verified    # what was verified, dependencies included
    note: str = ""       # for the plan: how long verifying the closure took in this bind


def kernels_backend(device: torch.device) -> str:
    """The `kernels` backend name for a torch device (what variant selection needs)."""
    if device.type == "cuda":
        return "rocm" if torch.version.hip else "cuda"
    return {"mps": "metal", "npu": "cann"}.get(device.type, device.type)


def local_variant_path(path: Path, backend: str) -> Path:
    """The build variant `kernels` would pick in a local kernel directory."""
    from kernels.resolver import resolve_local_kernel
    path = Path(path)
    check_json_files([path / METADATA, *path.glob(f"*/{METADATA}"), *path.glob(f"build/*/{METADATA}")])
    if not (path / "build").is_dir() and not (path / METADATA).is_file() and not any(path.glob(f"*/{METADATA}")):
        raise HubKernelError(f"{path}: no usable build in this directory: the kernel is not built (no build/ "
                             f"folder and no {METADATA}); run `kernelhub kernel build {path}` first")
    try:
        return resolve_local_kernel(path, backend=backend).variant_path
    except Exception as e:  # noqa: BLE001 - kernels raises FileNotFoundError/ValueError here
        for meta in [path / METADATA, *sorted(path.glob(f"build/*/{METADATA}"))]:
            if meta.is_file():  # our reading names the field; kernels' names only the line
                data = read_capped(meta, str(meta), KernelMetadataError, max_bytes=MAX_JSON_BYTES)
                read_variant_metadata({METADATA: data}, str(meta.parent))
        why = " ".join(str(e).split()).rstrip(":. ")  # kernels' text ends in ':' and a (maybe empty) trace
        raise HubKernelError(f"{path}: no usable build for {backend} in this directory ({why}); rebuild with "
                             f"`kernelhub kernel build {path}` (build.toml's backends must include {backend!r})") from e


# -- resolve and verify (no import, no lock held) ---------------------------------------------

def _hub_variant(ref: HubRef, backend: str, entry: LockEntry | None) -> Path:
    revision = entry.commit if entry else ref.revision
    version = None if entry else ref.version
    heal = entry is None  # under a lock a damaged cached file is refused by the comparison, never replaced
    if entry is not None or bool(revision and _COMMIT.fullmatch(revision)) or offline():
        try:
            return fetch_variant(ref, revision, version, backend, local_only=True, heal=heal)
        except Exception as e:  # noqa: BLE001 - not cached: go online below (or explain offline)
            if offline():
                raise HubKernelError(f"{ref} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading "
                                     f"it ({str(e).splitlines()[0]}). Run `kernelhub download` while online") from e
    probe(ref)
    try:
        return fetch_variant(ref, revision, version, backend, local_only=False, heal=heal)
    except Exception as e:  # noqa: BLE001 - translated into one clear error
        raise explain_failure(ref, e) from e


def verify(ref: HubRef | LocalRef, backend: str, lock: KernelLock | None, chain: tuple = (),
           seen: dict | None = None) -> Verified:
    """Resolve `ref` and its dependency closure and check every byte; imports nothing.

    `seen` (label -> Verified) makes each kernel of the graph verified once per walk.
    """
    seen = {} if seen is None else seen
    label = lock_key(ref) if isinstance(ref, HubRef) else str(ref.path.resolve())
    if label not in seen:
        seen[label] = _verify_one(ref, backend, lock, chain, seen)
    return seen[label]


def _verify_one(ref, backend: str, lock: KernelLock | None, chain: tuple, seen: dict) -> Verified:
    if isinstance(ref, HubRef):
        label = lock_key(ref)
        check_trusted(ref.repo_id, (*chain, label) if chain else ())
        entry = lock.entry_for(ref) if lock is not None else None
        path = _hub_variant(ref, backend, entry)
        commit = path.parents[1].name  # snapshots/<commit>/build/<variant>
        snapshot = read_variant(path, top=hub_repo_dir(path))
        source, identity = f"hub {ref.repo_id}@{commit}", ("hub", ref.repo_id, commit, path.name)
    else:
        label = str(ref.path)
        entry = lock.entry_for(ref) if lock is not None else None
        top = ref.path.resolve()  # the directory the user named; below it, no symlink is followed
        path = local_variant_path(top, backend)
        snapshot = read_variant(path, top=top)
        source, identity = f"local {ref.path}", ("local", str(top), path.name)
    if entry is not None:
        entry.verify(path.name, snapshot.digests, path)
    meta = read_variant_metadata(snapshot.files, str(path))
    check_with_kernels(meta, path.name, label)
    declared = read_kernel_metadata(snapshot.files, str(path))
    repos = [dep.repo_id for dep in meta.depends]
    if len(set(repos)) != len(repos):  # kernels.get_kernel_dep looks dependencies up by repo id
        raise HubKernelError(f"{label}: metadata.json depends on one repo twice ({', '.join(repos)})")
    deps = []
    for dep in meta.depends:
        check_edge((*chain, label), lock_key(dep))
        deps.append(verify(dep, backend, lock, (*chain, label), seen))
    return Verified(ref, label, source, identity, snapshot, meta, declared, tuple(deps))


def check_closure_against(closure: Verified, lock: KernelLock | None) -> None:
    """Every Hub kernel of an already verified closure is still trusted and, under `lock`, in
    it with these exact files."""
    for node in closure.walk():
        if node.identity[0] == "hub":
            check_trusted(node.ref.repo_id)
        if lock is None:
            continue
        entry = lock.entry_for(node.ref)
        if node.identity[0] == "hub" and entry.commit != node.identity[2]:
            raise HubKernelError(f"{node.label} is locked at {entry.commit[:12]} but {node.source} was loaded")
        entry.verify(node.variant, node.snapshot.digests, node.snapshot.root)


# -- import (per-kernel locks only) -----------------------------------------------------------

_IMPORTED: dict[tuple, LoadedKernel] = {}       # (identity, content key) -> loaded
_BY_REF: dict[tuple, LoadedKernel] = {}         # (what was asked, backend) -> loaded: warm binds skip I/O
_GUARD = threading.Lock()                       # held only to look up or create the per-kernel locks
_KERNEL_LOCKS: dict[tuple, threading.Lock] = collections.defaultdict(threading.Lock)


def _import(node: Verified) -> LoadedKernel:
    key = (node.identity, node.closure_key)
    with _GUARD:
        per_kernel = _KERNEL_LOCKS[key]
    with per_kernel:  # the second thread finds the first one's import
        if key not in _IMPORTED:
            deps = {dep.ref.repo_id: _import(dep).module for dep in node.deps}
            copy = verified_copy(node.snapshot)  # outside the try: a refusal, not an import failure
            try:
                module = import_variant(node.snapshot, node.meta.python_name, copy, deps, node.closure_key)
            except Exception as e:  # noqa: BLE001 - any failure inside the kernel's own code
                first = (str(e).strip().splitlines() or [""])[0]
                raise HubKernelError(f"{node.label}: the kernel failed to import: {type(e).__name__}: {first}") from e
            _IMPORTED[key] = LoadedKernel(module, node.source, node.declared,
                                          attention_specs(node.declared, node.source), node)
        return _IMPORTED[key]


def load_kernel(ref: HubRef | LocalRef, device: torch.device, lock: KernelLock | None = None) -> LoadedKernel:
    """Trust, fetch, verify and import `ref` and its dependencies for `device`, once per process."""
    backend = kernels_backend(device)
    asked = (lock_key(ref) if isinstance(ref, HubRef) else str(ref.path.resolve()), backend,
             lock.entry_for(ref).commit if lock is not None and isinstance(ref, HubRef) else None)
    loaded = _BY_REF.get(asked)
    if loaded is None:
        with hub_budget():
            current_budget()  # a bad $KERNELHUB_HUB_TIMEOUT is an error whatever the ref
            start = time.perf_counter()
            closure = verify(ref, backend, lock, seen=bind_memo(f"verified {backend}"))
            kernels, seconds = sum(1 for _ in closure.walk()), time.perf_counter() - start
            note = f"{kernels} kernel{'s' if kernels > 1 else ''} read and verified in {seconds:.2f} s"
            logger.info("%s: %s", closure.label, note)
            loaded = _BY_REF[asked] = dataclasses.replace(_import(closure), note=note)
    check_closure_against(loaded.closure, lock)  # what is handed out, not only what was read
    return loaded


def forget_loaded() -> None:
    """Forget every kernel imported so far, as a new process would (tests that serve a new
    commit under the same ref, or count imports)."""
    with _GUARD:
        _IMPORTED.clear()
        _BY_REF.clear()
        _KERNEL_LOCKS.clear()
        forget_imports()
