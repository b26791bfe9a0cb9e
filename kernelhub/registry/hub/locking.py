"""Creating, checking and prefetching locks (`kernelhub lock`, `lock --check`, `download`).

Locking resolves each Hub `org/name@rev` to a commit and records the sha256 of every file
of every build variant, then does the same for every kernel in its dependency closure, so
one lock serves CPU and GPU machines alike and pins everything that can run. Local
directories are locked the same way, keyed by their path relative to the lock file.

Offline (`HF_HUB_OFFLINE=1`) a Hub ref is locked from the cache: what you have is what you
pin. Nothing is ever imported while locking or checking.

Downloads show huggingface_hub's own bars; verifying shows a bar over the locked variants.
Both follow `HF_HUB_DISABLE_PROGRESS_BARS`.

>>> lock = lock_kernels(["my-org/rmsnorm@v1"])        # doctest: +SKIP
>>> lock.entries["my-org/rmsnorm@v1"].commit           # doctest: +SKIP
'3f2a...'
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from kernelhub.declare.errors import KernelhubError
from kernelhub.declare.log import progress
from kernelhub.registry.hub.depends import check_edge
from kernelhub.registry.hub.fetch import HubKernelError, explain_failure, hub_budget, offline, probe, run_bounded
from kernelhub.registry.hub.lockfile import KernelLock, LockEntry, LockError, lock_key
from kernelhub.registry.hub.metadata import read_variant_metadata
from kernelhub.registry.hub.ref import HubRef, LocalRef, parse_kernel_ref
from kernelhub.registry.hub.snapshot import hub_repo_dir, read_variant
from kernelhub.registry.hub.trust import check_trusted

logger = logging.getLogger(__name__)


def _snapshot_build(ref: HubRef, revision: str | None, version: int | None, local_only: bool) -> Path:
    """The `build/` folder of `ref` at its resolved commit: every variant downloaded, or what is cached."""
    from huggingface_hub import HfApi
    from kernels._versions import select_revision_or_version

    def fetch():
        rev = select_revision_or_version(ref.repo_id, revision=revision, version=version, local_files_only=local_only)
        return HfApi().snapshot_download(ref.repo_id, repo_type="kernel", revision=rev, allow_patterns=["build/*"],
                                         ignore_patterns=["*.pyc", "**/__pycache__/**"], local_files_only=local_only)

    try:
        path = fetch() if local_only else run_bounded(str(ref), fetch)
    except HubKernelError:
        raise
    except Exception as e:  # noqa: BLE001 - translated into one clear error
        if local_only:
            raise HubKernelError(f"{ref} is not in the local cache, and HF_HUB_OFFLINE=1 locks only what is "
                                 "cached. Bind or download it once while online") from e
        raise explain_failure(ref, e) from e
    return Path(path) / "build"


def _variant_dirs(build: Path) -> list[Path]:
    dirs = sorted(p for p in build.iterdir() if p.is_dir() and not p.is_symlink()) if build.is_dir() else []
    if not dirs:
        raise HubKernelError(f"{build} holds no build variants")
    return dirs


def _lock_variants(build: Path, top: Path | None) -> tuple[dict, set]:
    """(variant -> {"files": digests}, dependency refs of any variant); unsafe files are refused."""
    variants, depends = {}, set()
    for variant in _variant_dirs(build):
        snapshot = read_variant(variant, top=top)
        variants[variant.name] = {"files": snapshot.digests}
        depends.update(read_variant_metadata(snapshot.files, str(variant)).depends)
    return variants, depends


def _local_build(path: Path) -> Path:
    """The folder holding a local kernel's variants: its build/, or itself for a build folder."""
    if (path / "metadata.json").is_file():  # the directory is one variant
        return path.parent
    return path / "build" if (path / "build").is_dir() else path


def lock_kernels(refs, existing: KernelLock | None = None, path=None) -> KernelLock:
    """A lock with an entry per ref and per dependency (symbols ignored), merged into `existing`.

    `path` is where the lock will be written (local directories are keyed relative to it).
    """
    lock = KernelLock(dict(existing.entries) if existing else {}, Path(path) if path else None)
    with hub_budget():
        start, done = time.perf_counter(), set()
        for text in refs:
            _lock_one(parse_kernel_ref(text, "kernelhub lock"), lock, (), done)
        logger.info("locked %d kernels in %.2f s", len(done), time.perf_counter() - start)
    return lock


def _lock_one(ref, lock: KernelLock, chain: tuple, done: set) -> None:
    """Lock `ref` and its dependencies; `done` holds what this run locked already (each kernel
    of a graph is fetched and read once)."""
    key = lock.key_for(ref) if isinstance(ref, LocalRef) else lock_key(ref)
    if key in done:
        return
    if isinstance(ref, LocalRef):
        top = ref.path.resolve()
        build = _local_build(top)
        variants, depends = _lock_variants(build, top if build.is_relative_to(top) else build)
        lock.entries[key] = LockEntry(variants, path=key[2:])
    else:
        label = lock_key(ref)
        check_trusted(ref.repo_id, (*chain, label) if chain else ())
        local_only = offline()
        if not local_only:
            probe(ref)
        build = _snapshot_build(ref, ref.revision, ref.version, local_only)
        variants, depends = _lock_variants(build, hub_repo_dir(next(iter(_variant_dirs(build)))))
        lock.entries[label] = LockEntry(variants, ref.repo_id, ref.requested, build.parent.name)
    chain = (*chain, key)
    done.add(key)
    for dep in sorted(depends, key=lock_key):
        check_edge(chain, lock_key(dep))
        _lock_one(dep, lock, chain, done)


def _entry_build(key: str, entry: LockEntry, lock: KernelLock, local_only: bool) -> Path:
    if entry.path is not None:
        return _local_build(lock.base / entry.path)
    ref = parse_kernel_ref(key, "lock entry")
    check_trusted(ref.repo_id)
    return _snapshot_build(ref, entry.commit, None, local_only)


def download_locked(lock: KernelLock) -> list[str]:
    """Fetch every locked Hub kernel at its pinned commit and verify every variant; one line each."""
    lines = []
    entries = sorted(lock.entries.items())
    with hub_budget(), progress(desc="verifying kernels", total=sum(len(e.variants) for _, e in entries),
                                unit="variant") as bar:
        for key, entry in entries:
            logger.info("fetching %s @ %s", key, (entry.commit or "local")[:12])
            build = _entry_build(key, entry, lock, local_only=offline())
            for variant in sorted(entry.variants):
                path = build / variant
                entry.verify(variant, read_variant(path, top=hub_repo_dir(path)).digests, path)
                bar.update()
            lines.append(f"{key} @ {(entry.commit or 'local')[:12]}: {len(entry.variants)} variants verified")
    return lines


def check_lock(lock: KernelLock) -> tuple[list[str], list[str]]:
    """(lines, problems): each locked variant checked against the cache or the local directory.

    Makes no request and imports nothing. A variant not downloaded is reported, not a problem,
    unless none of an entry's variants is there.
    """
    lines, problems = [], []
    entries = sorted(lock.entries.items())
    with progress(desc="checking kernels", total=sum(len(e.variants) for _, e in entries), unit="variant") as bar:
        for key, entry in entries:
            lines_, problems_ = _check_entry(key, entry, lock, bar)
            lines += lines_
            problems += problems_
    return lines, problems


def _check_entry(key: str, entry: LockEntry, lock: KernelLock, bar) -> tuple[list[str], list[str]]:
    lines, problems = [], []
    try:
        build = _entry_build(key, entry, lock, local_only=True)
    except KernelhubError as e:
        bar.update(len(entry.variants))
        return lines, [f"{key}: {e}"]
    present = 0
    for variant in sorted(entry.variants):
        bar.update()
        path = build / variant
        if not path.is_dir():
            lines.append(f"{key} {variant}: not downloaded")
            continue
        try:
            entry.verify(variant, read_variant(path, top=hub_repo_dir(path)).digests, path)
        except (LockError, KernelhubError) as e:
            problems.append(f"{key} {variant}: {e}")
            continue
        present += 1
        lines.append(f"{key} {variant}: ok ({len(entry.variants[variant]['files'])} files)")
    if not present and not problems:
        problems.append(f"{key}: none of its variants is in the cache; run `kernelhub download`")
    return lines, problems
