"""Fetching one build variant of one Hub kernel, bounded in time, through Hugging Face `kernels`.

`kernels` resolves versions and picks the variant for the target device's backend;
`huggingface_hub` downloads. kernelhub bounds both:

- every request has connect and read timeouts (huggingface_hub's default client has none);
- each bind has one deadline for all its Hub work (`KERNELHUB_HUB_TIMEOUT`, default 30 s):
  network work runs in a worker thread and the bind stops waiting when time is up;
- within one bind, an endpoint found unreachable is not asked again for the next ref;
- no lock is held across network I/O, so a stalled Hub never delays another thread's bind
  of a local directory or a cached kernel.

Only the one variant is fetched: a kernel's dependencies are resolved by kernelhub
(`loader`), under its own trust policy, never by `kernels`' publisher flag.

>>> with hub_budget():
...     current_budget().remaining() > 0
True
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
import time
from pathlib import Path

from kernelhub.declare.errors import HubKernelError, KernelhubError
from kernelhub.registry.hub.ref import HubRef

TIMEOUT_ENV = "KERNELHUB_HUB_TIMEOUT"
DEFAULT_DEADLINE = 30.0
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 10.0
PROBE_TIMEOUT = 3.0  # the reachability probe: one small request, so a dead Hub fails fast



def deadline_seconds() -> float:
    """$KERNELHUB_HUB_TIMEOUT as seconds, validated."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_DEADLINE
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise KernelhubError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds; set a positive number "
                             f"such as {TIMEOUT_ENV}=30 (the default), or unset it")
    return value


@dataclasses.dataclass
class HubBudget:
    """One bind's Hub allowance: a deadline, and the endpoints already found unreachable."""

    deadline: float
    seconds: float
    unreachable: dict = dataclasses.field(default_factory=dict)  # endpoint -> why

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


_SCOPE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kernelhub_hub_scope", default=None)


@contextlib.contextmanager
def hub_budget():
    """One budget for all Hub work inside the block (a bind); nested blocks share the outer one.

    The deadline starts with the first Hub work (`current_budget`), not at the block's start.
    """
    if _SCOPE.get() is not None:
        yield
        return
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def current_budget() -> HubBudget:
    """The budget of the enclosing `hub_budget()` block, started (and $KERNELHUB_HUB_TIMEOUT read) on first use."""
    scope = _SCOPE.get()
    assert scope is not None, "Hub work needs an enclosing hub_budget()"
    if "budget" not in scope:
        seconds = deadline_seconds()
        scope["budget"] = HubBudget(time.monotonic() + seconds, seconds)
    return scope["budget"]


def endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _bounded_client_factory():
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook
    return httpx2.Client(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True,
                         timeout=httpx2.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT))


def _ensure_request_timeouts() -> None:
    """Give huggingface_hub's shared client timeouts, unless the user installed their own client."""
    from huggingface_hub.utils import _http
    if _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory:
        _http.set_client_factory(_bounded_client_factory)


def run_bounded(what: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a worker thread, waited for until the bind's deadline.

    On time-out the worker is left to finish on its own (its request times out by itself);
    nothing it produces is used.
    """
    budget = current_budget()
    _ensure_request_timeouts()
    result: dict = {}
    done = threading.Event()

    def work():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = e
        finally:
            done.set()

    threading.Thread(target=work, name=f"kernelhub-hub {what}", daemon=True).start()
    if not done.wait(max(budget.remaining(), 0.0)):
        why = f"no answer within the {budget.seconds:g} s deadline"
        budget.unreachable[endpoint()] = why
        raise HubKernelError(f"{what}: the Hub at {endpoint()} gave {why} ({TIMEOUT_ENV}). Check the network or "
                             f"HF_ENDPOINT, raise {TIMEOUT_ENV}, or prefetch with `kernelhub download`")
    if "error" in result:
        raise result["error"]
    return result["value"]


def probe(ref: HubRef) -> None:
    """Fail fast, naming the endpoint, when the Hub cannot be reached; remembered for this bind."""
    budget = current_budget()
    known = budget.unreachable.get(endpoint())
    if known is not None:
        raise HubKernelError(f"{ref}: the Hub at {endpoint()} was found unreachable earlier in this bind ({known}) "
                             "and the kernel is not in the local cache")

    def ask():
        from huggingface_hub.utils import get_session
        timeout = min(PROBE_TIMEOUT, max(budget.remaining(), 0.05))
        get_session().get(f"{endpoint()}/api/kernels/{ref.repo_id}/refs", timeout=timeout)

    try:
        run_bounded(str(ref), ask)
    except HubKernelError:
        raise
    except Exception as e:  # noqa: BLE001 - any transport failure means "unreachable"
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        budget.unreachable[endpoint()] = why
        raise HubKernelError(f"the Hub at {endpoint()} is unreachable ({why}) and {ref} is not in the local "
                             "cache. Check the network or HF_ENDPOINT, or prefetch with `kernelhub download`") from e


def fetch_variant(ref: HubRef, revision: str | None, version: int | None, backend: str, local_only: bool) -> Path:
    """The variant directory of `ref` for `backend` in the HF cache, downloading it unless `local_only`.

    Nothing is imported and no dependency is followed.
    """
    from huggingface_hub import HfApi
    from kernels._versions import select_revision_or_version
    from kernels.resolver import resolve_hub_cache_kernel, resolve_hub_kernel

    def fetch():
        rev = select_revision_or_version(ref.repo_id, revision=revision, version=version, local_files_only=local_only)
        api = HfApi()
        if local_only:
            return resolve_hub_cache_kernel(api, ref.repo_id, revision=rev, backend=backend).variant_path
        return resolve_hub_kernel(ref.repo_id, api=api, backend=backend, revision=rev).install(api=api).variant_path

    return Path(fetch() if local_only else run_bounded(str(ref), fetch))


def explain_failure(ref, e: Exception) -> HubKernelError:
    """One clear error for what huggingface_hub or kernels raised while fetching `ref`."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    if isinstance(e, HubKernelError):
        return e
    if isinstance(e, RepositoryNotFoundError):
        return HubKernelError(f"{ref}: no kernel repo {ref.repo_id!r} on {endpoint()}")
    if isinstance(e, RevisionNotFoundError):
        return HubKernelError(f"{ref}: revision {ref.requested!r} does not exist in {ref.repo_id!r}")
    response = getattr(e, "response", None)
    if response is not None and getattr(response, "status_code", None) == 404:
        return HubKernelError(f"{ref}: no kernel repo {ref.repo_id!r} with revision {ref.requested!r} on {endpoint()} "
                              f"(404 for {getattr(response, 'url', '')})")
    text = str(e).strip()
    if isinstance(e, FileNotFoundError) and "build variant" in text:
        return HubKernelError(f"{ref}: no build variant for this platform. {text}")
    return HubKernelError(f"{ref}: {text or type(e).__name__}")
