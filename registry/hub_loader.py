"""Loading kernels from the Hub or a local directory, through Hugging Face `kernels`.

`kernels` does the downloading and build-variant selection (we pass the backend of the
target device). kernelhub adds, in this order:

1. trust: an untrusted repo is refused before any request is made;
2. offline-first: a locked or commit-pinned kernel already in the cache is used without a
   network request; an unreachable Hub fails in seconds, naming the endpoint;
3. lock: every file of the chosen variant is compared with the lock before import;
4. one import per kernel variant per process, however many threads bind at once.

>>> kernels_backend(torch.device("cpu"))
'cpu'
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from pathlib import Path
from types import ModuleType

import torch

from kernelhub.registry.errors import KernelhubError
from kernelhub.registry.hub_ref import HubRef, LocalRef
from kernelhub.registry.kernel_metadata import attention_specs, read_kernel_metadata
from kernelhub.registry.lock import KernelLock
from kernelhub.registry.trust import check_trusted

TIMEOUT_ENV = "KERNELHUB_HUB_TIMEOUT"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


class HubKernelError(KernelhubError):
    """A kernel that cannot be resolved, downloaded, verified or imported."""


@dataclasses.dataclass(frozen=True)
class LoadedKernel:
    """An imported kernel and where exactly it came from."""

    module: ModuleType
    source: str          # "hub org/name@<commit>" or "local <dir>"
    metadata: dict       # the kernel's kernelhub.json ({} without one)
    attention: dict      # symbol -> AttentionSpec, parsed from `metadata` before import


def kernels_backend(device: torch.device) -> str:
    """The `kernels` backend name for a torch device (what variant selection needs)."""
    if device.type == "cuda":
        return "rocm" if torch.version.hip else "cuda"
    return {"mps": "metal", "npu": "cann"}.get(device.type, device.type)


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def probe_hub(repo_id: str) -> str | None:
    """None if the Hub answers within the timeout, else why not. huggingface_hub's own API
    calls have no timeout, so a silent endpoint would otherwise hang a bind."""
    from huggingface_hub.utils import get_session
    timeout = float(os.environ.get(TIMEOUT_ENV, "3"))
    url = f"{_endpoint()}/api/kernels/{repo_id}/refs"
    try:
        get_session().get(url, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any transport failure means "unreachable"
        return f"{type(e).__name__}: {e}" if str(e) else f"no answer within {timeout:g} s"
    return None


def _install(ref: HubRef, revision, version, backend, local_only) -> Path:
    from kernels import install_kernel
    # kernelhub's allowlist already decided; kernels' own publisher check needs a Hub API we may not reach.
    return Path(install_kernel(ref.repo_id, revision=revision, version=version, backend=backend,
                               local_files_only=local_only, trust_remote_code=[ref.repo_id]))


def explain_failure(ref, e: Exception) -> HubKernelError:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    if isinstance(e, RepositoryNotFoundError):
        return HubKernelError(f"{ref}: no kernel repo {ref.repo_id!r} on {_endpoint()}")
    if isinstance(e, RevisionNotFoundError):
        return HubKernelError(f"{ref}: revision {ref.requested!r} does not exist in {ref.repo_id!r}")
    response = getattr(e, "response", None)
    if response is not None and getattr(response, "status_code", None) == 404:
        return HubKernelError(f"{ref}: no kernel repo {ref.repo_id!r} with revision {ref.requested!r} on {_endpoint()} "
                              f"(404 for {getattr(response, 'url', '')})")
    text = str(e).strip()
    if isinstance(e, FileNotFoundError) and "build variant" in text:
        return HubKernelError(f"{ref}: no build variant for this platform. {text}")
    return HubKernelError(f"{ref}: {text or type(e).__name__}")


def resolve_variant_path(ref: HubRef, backend: str, lock: KernelLock | None = None) -> Path:
    """Download (or find in the cache) the variant of `ref` for `backend`; no import."""
    check_trusted(ref.repo_id)
    entry = lock.entry_for(ref) if lock is not None else None
    revision = entry.commit if entry else ref.revision
    version = None if entry else ref.version
    pinned = entry is not None or bool(revision and _COMMIT.match(revision))
    if pinned or offline():
        try:
            return _install(ref, revision, version, backend, local_only=True)
        except Exception as e:  # noqa: BLE001 - not cached: go online below (or explain offline)
            if offline():
                raise HubKernelError(f"{ref} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading "
                                     f"it ({str(e).splitlines()[0]}). Run `kernelhub download` while online") from e
    why = probe_hub(ref.repo_id)
    if why is not None:
        raise HubKernelError(f"the Hub at {_endpoint()} is unreachable ({why}) and {ref} is not in the local "
                             "cache. Check the network or HF_ENDPOINT, or prefetch with `kernelhub download`")
    try:
        return _install(ref, revision, version, backend, local_only=False)
    except Exception as e:  # noqa: BLE001 - translated into one clear error
        raise explain_failure(ref, e) from e


_LOADED: dict[tuple, LoadedKernel] = {}
_LOCK = threading.Lock()


def _import(variant_path: Path, backend: str, origin) -> ModuleType:
    from kernels import get_local_kernel
    try:
        return get_local_kernel(variant_path, backend=backend)
    except Exception as e:  # noqa: BLE001 - any failure inside the kernel's own code
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "requires kernels>=" in str(e):
            raise HubKernelError(f"{origin}: {first}") from e
        raise HubKernelError(f"{origin}: the kernel failed to import: {type(e).__name__}: {first}") from e


def load_kernel(ref: HubRef | LocalRef, device: torch.device, lock: KernelLock | None = None) -> LoadedKernel:
    """Resolve, verify and import `ref` for `device`, once per process per variant."""
    backend = kernels_backend(device)
    key = (str(ref), backend, lock.entry_for(ref).commit if lock is not None and isinstance(ref, HubRef) else None)
    with _LOCK:  # one resolver at a time: the second thread finds the first one's import
        loaded = _LOADED.get(key)
        if loaded is None:
            loaded = _LOADED[key] = _load(ref, backend, lock)
        return loaded


def _load(ref, backend, lock) -> LoadedKernel:
    if isinstance(ref, LocalRef):
        variant_path, source = local_variant_path(ref.path, backend), f"local {ref.path}"
    else:
        variant_path = resolve_variant_path(ref, backend, lock)
        source = f"hub {ref.repo_id}@{variant_path.parents[1].name}"  # snapshots/<commit>/build/<variant>
        if lock is not None:
            lock.entry_for(ref).verify(variant_path.name, variant_path)  # before a line of it is imported
    metadata = read_kernel_metadata(variant_path)
    attention = attention_specs(metadata, source)  # a bad declaration is refused before import
    return LoadedKernel(_import(variant_path, backend, ref), source, metadata, attention)


def local_variant_path(path: Path, backend: str) -> Path:
    """The build variant `kernels` would pick in a local kernel directory."""
    from kernels.resolver import resolve_local_kernel
    try:
        return resolve_local_kernel(Path(path), backend=backend).variant_path
    except Exception as e:  # noqa: BLE001 - kernels raises FileNotFoundError/ValueError here
        raise HubKernelError(f"{path}: no usable build for this platform in this directory. "
                             f"{str(e).strip()}") from e


def forget_loaded() -> None:
    """Drop the in-process memo (tests that serve a new commit under the same ref)."""
    with _LOCK:
        _LOADED.clear()
