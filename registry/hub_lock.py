"""Creating locks and prefetching locked kernels (`kernelhub lock`, `kernelhub download`).

Locking resolves each `org/name@rev` to a commit and records the sha256 of every file of
every build variant in the repo, so one lock serves CPU and GPU machines alike.

>>> lock = lock_kernels(["my-org/rmsnorm@v1"])        # doctest: +SKIP
>>> lock.entries["my-org/rmsnorm@v1"].commit           # doctest: +SKIP
'3f2a...'
"""

from __future__ import annotations

from pathlib import Path

from kernelhub.registry.errors import KernelhubError
from kernelhub.registry.hub_loader import HubKernelError, explain_failure, probe_hub
from kernelhub.registry.hub_ref import HubRef, parse_kernel_ref
from kernelhub.registry.lock import KernelLock, LockEntry, file_digests, lock_key
from kernelhub.registry.trust import check_trusted


def _all_variants(ref: HubRef, revision: str | None, version: int | None) -> Path:
    """The `build/` folder of `ref` at the resolved commit, every variant downloaded."""
    from huggingface_hub import HfApi
    from kernels._versions import select_revision_or_version
    why = probe_hub(ref.repo_id)
    if why is not None:
        raise HubKernelError(f"cannot lock or download {ref}: the Hub is unreachable ({why})")
    try:  # kernels resolves v<N> to its branch; the snapshot folder is named by the commit
        revision = select_revision_or_version(ref.repo_id, revision=revision, version=version, local_files_only=False)
        path = HfApi().snapshot_download(ref.repo_id, repo_type="kernel", revision=revision,
                                         allow_patterns=["build/*"], ignore_patterns=["*.pyc", "**/__pycache__/**"])
    except Exception as e:  # noqa: BLE001 - translated into one clear error
        raise explain_failure(ref, e) from e
    return Path(path) / "build"


def lock_kernels(refs, existing: KernelLock | None = None) -> KernelLock:
    """A lock with an entry per Hub ref (symbols ignored), merged into `existing`."""
    entries = dict(existing.entries) if existing else {}
    for text in refs:
        ref = parse_kernel_ref(text, "kernelhub lock")
        if not isinstance(ref, HubRef):
            raise KernelhubError(f"{text!r} is a local directory; only Hub kernels are locked")
        check_trusted(ref.repo_id)
        build = _all_variants(ref, ref.revision, ref.version)
        variants = {v.name: {"files": file_digests(v)} for v in sorted(build.iterdir()) if v.is_dir()}
        entries[lock_key(ref)] = LockEntry(ref.repo_id, ref.requested, build.parent.name, variants)
    return KernelLock(entries, existing.path if existing else None)


def download_locked(lock: KernelLock) -> list[str]:
    """Fetch every locked kernel at its pinned commit and verify every variant; one line each."""
    lines = []
    for key, entry in sorted(lock.entries.items()):
        ref = parse_kernel_ref(key, "lock entry")
        check_trusted(ref.repo_id)
        build = _all_variants(ref, entry.commit, None)
        for variant in sorted(entry.variants):
            entry.verify(variant, build / variant)
        lines.append(f"{key} @ {entry.commit[:12]}: {len(entry.variants)} variants verified")
    return lines
