"""Fetching one build variant of one Hub kernel, bounded in time, through Hugging Face `kernels`.

`kernels` resolves versions and picks the variant for the target device's backend;
`huggingface_hub` downloads. kernelhub bounds both:

- each bind has one deadline for all its Hub work (`KERNELHUB_HUB_TIMEOUT`, default 30 s):
  network work runs in a worker thread, and every request in it is bounded by that
  deadline and cancelled when the bind gives up (`transport`), so no thread, socket or
  huggingface_hub file lock outlives the bind by more than `CANCEL_GRACE` seconds;
- within one bind, an endpoint found unreachable is not asked again for the next ref;
- no lock is held across network I/O, so a stalled Hub never delays another thread's bind
  of a local directory or a cached kernel;
- the reachability probe reads at most `PROBE_MAX_BYTES` of its answer.

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
import json
import os
import threading
import time
from pathlib import Path

from kernelhub.declare.errors import HubKernelError, KernelhubError
from kernelhub.registry.hub import cache_check, transport
from kernelhub.registry.hub.metadata import check_json_files
from kernelhub.registry.hub.ref import HubRef

TIMEOUT_ENV = "KERNELHUB_HUB_TIMEOUT"
DEFAULT_DEADLINE = 30.0
CONNECT_TIMEOUT, READ_TIMEOUT = 5.0, 10.0
PROBE_TIMEOUT = 3.0  # the reachability probe: one small request, so a dead Hub fails fast
PROBE_MAX_BYTES = 64 << 10  # of the probe's answer; only reachability is asked
CANCEL_GRACE = 1.0  # how long a cancelled worker may take to unwind after the deadline



class HubTimeout(HubKernelError):
    """Hub work that ran out of time: the bind's deadline (`of_bind`) or a shorter limit of its own."""

    def __init__(self, message: str, of_bind: bool):
        super().__init__(message)
        self.of_bind = of_bind


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


def bind_memo(name: str) -> dict:
    """A dict shared by all Hub work inside the enclosing `hub_budget()` block (one bind, one
    `kernelhub lock`): what was verified there is not verified again."""
    scope = _SCOPE.get()
    assert scope is not None, "Hub work needs an enclosing hub_budget()"
    return scope.setdefault(name, {})


def endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def run_bounded(what: str, fn, *args, limit: float | None = None, **kwargs):
    """`fn(*args, **kwargs)` in a worker thread whose requests end at the bind's deadline (or
    `limit` seconds from now, if sooner).

    On time-out the worker's requests are cancelled and the worker is waited for (at most
    `CANCEL_GRACE` seconds) before the error is raised; nothing it produced is used.
    """
    budget = current_budget()
    transport.install(CONNECT_TIMEOUT, READ_TIMEOUT)
    deadline = budget.deadline if limit is None else min(budget.deadline, time.monotonic() + limit)
    scope = transport.RequestScope(deadline)
    result: dict = {}
    done = threading.Event()

    def work():
        try:
            result["value"] = scope.run(fn, *args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = e
        finally:
            done.set()

    worker = threading.Thread(target=work, name=f"kernelhub-hub {what}", daemon=True)
    worker.start()
    if not done.wait(max(scope.remaining(), 0.0)) or isinstance(result.get("error"), transport.RequestCancelled):
        scope.cancel()  # its sockets are shut down: the worker unwinds and releases huggingface_hub's file locks
        worker.join(CANCEL_GRACE)
        of_bind = deadline == budget.deadline
        why = f"no answer within the {budget.seconds:g} s deadline" if of_bind else f"no answer within {limit:g} s"
        budget.unreachable[endpoint()] = why
        raise HubTimeout(f"{what}: the Hub at {endpoint()} gave {why} ({TIMEOUT_ENV}). Check the network or "
                         f"HF_ENDPOINT, raise {TIMEOUT_ENV}, or prefetch with `kernelhub download`", of_bind)
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
        url = f"{endpoint()}/api/kernels/{ref.repo_id}/refs"
        with get_session().stream("GET", url, timeout=PROBE_TIMEOUT) as reply:
            seen = 0
            for chunk in reply.iter_raw():  # read up to a cap: the rest is dropped with the connection
                seen += len(chunk)
                if seen >= PROBE_MAX_BYTES:
                    break

    try:
        run_bounded(str(ref), ask, limit=PROBE_TIMEOUT)
    except HubTimeout as e:
        if e.of_bind:
            raise
        why = budget.unreachable[endpoint()] = f"no answer within {PROBE_TIMEOUT:g} s"
        raise HubKernelError(f"the Hub at {endpoint()} is unreachable ({why}) and {ref} is not in the local "
                             "cache. Check the network or HF_ENDPOINT, or prefetch with `kernelhub download`") from None
    except HubKernelError:
        raise
    except Exception as e:  # noqa: BLE001 - any transport failure means "unreachable"
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        budget.unreachable[endpoint()] = why
        raise HubKernelError(f"the Hub at {endpoint()} is unreachable ({why}) and {ref} is not in the local "
                             "cache. Check the network or HF_ENDPOINT, or prefetch with `kernelhub download`") from e


def fetch_variant(ref: HubRef, revision: str | None, version: int | None, backend: str, local_only: bool,
                  heal: bool = True) -> Path:
    """The variant directory of `ref` for `backend` in the HF cache, downloading it unless `local_only`.

    Nothing is imported and no dependency is followed. With `heal`, damaged cached files
    (`cache_check`) are removed and fetched again (once), never used.
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

    def fetched() -> Path:
        snapshots = cache_check.repo_cache_dir(ref.repo_id) / "snapshots"
        check_json_files(p for name in cache_check.JSON_FILES for p in snapshots.glob(f"*/build/*/{name}"))
        try:
            return Path(fetch() if local_only else run_bounded(str(ref), fetch))
        except HubTimeout:
            raise
        except Exception:  # noqa: BLE001 - `kernels` fails on a damaged metadata.json before we see a path
            if not heal or not cache_check.drop(cache_check.damaged_metadata(ref.repo_id)):
                raise
        return Path(fetch() if local_only else run_bounded(str(ref), fetch))

    try:
        path = fetched()
    finally:
        if heal and not local_only:  # what the Hub sent damaged does not stay in the cache
            cache_check.drop(cache_check.damaged_metadata(ref.repo_id))
    bad = cache_check.damaged_variant(path) if heal else {}
    if bad and local_only:
        raise FileNotFoundError(f"damaged in the cache, removed: {'; '.join(cache_check.drop(bad))}")
    if bad:
        cache_check.drop(bad)
        path = fetched()
        bad = cache_check.damaged_variant(path)
        if bad:
            raise HubKernelError(f"{ref}: the Hub at {endpoint()} sent damaged files, removed from the cache: "
                                 f"{'; '.join(cache_check.drop(bad))}")
    return path


def explain_failure(ref, e: Exception) -> HubKernelError:
    """One clear error for what huggingface_hub or kernels raised while fetching `ref`."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    if isinstance(e, HubKernelError):
        return e
    if isinstance(e, transport.ReplyRefused):
        return HubKernelError(f"{ref}: the Hub at {endpoint()} gave a reply kernelhub refuses: {e}")
    if isinstance(e, (KeyError, TypeError, AttributeError, json.JSONDecodeError)):
        # huggingface_hub reads the Hub's JSON by key: `{}` for a refs listing raises KeyError('branches')
        return HubKernelError(f"{ref}: the Hub at {endpoint()} answered with something that is not a Hugging Face "
                              f"Hub API reply ({type(e).__name__}: {e}); check that HF_ENDPOINT names a Hub")
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
