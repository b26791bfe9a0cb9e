"""Hub requests bounded by the bind that makes them: one total deadline, cancellation, size caps.

kernelhub gives huggingface_hub an HTTP client (unless the user installed their own with
`huggingface_hub.set_client_factory`) whose requests belong to the `RequestScope` of the
bind that made them:

- every socket operation waits at most until the scope's deadline: a per-read timeout
  alone lets a server that sends one byte a second hold a request forever;
- when a bind gives up, its scope is cancelled: the sockets of its in-flight requests are
  shut down, so the worker thread unwinds at once (huggingface_hub's file locks are released
  on the way out) and nothing of the bind outlives it;
- a reply larger than its cap is cut off: `MAX_API_BYTES` for Hub API answers (refs,
  revision info, file lists), `MAX_DOWNLOAD_BYTES` for one file (`MAX_JSON_BYTES` for a
  `metadata.json` or `kernelhub.json`);
- a HEAD answer that contradicts itself (size 0 with the hash of non-empty content) is
  refused before huggingface_hub writes anything to the cache.

These failures are plain exceptions, not httpx errors, so huggingface_hub does not retry them.

>>> scope = RequestScope(time.monotonic() + 5)
>>> scope.run(lambda: current_scope() is scope)
True
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import socket
import threading
import time

from kernelhub.declare.json_limits import human_size
from kernelhub.registry.hub.cache_check import EMPTY_GIT_BLOB
from kernelhub.registry.hub.metadata import MAX_JSON_BYTES
from kernelhub.registry.hub.snapshot import MAX_FILE_BYTES

MAX_API_BYTES = 16 << 20      # a Hub API answer (JSON); real ones are a few KiB
MAX_DOWNLOAD_BYTES = MAX_FILE_BYTES
JSON_FILES = ("/metadata.json", "/kernelhub.json")  # downloads capped like their reading (MAX_JSON_BYTES)
EMPTY_HASHES = (EMPTY_GIT_BLOB, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")  # + sha256(b"")
_HEX_ETAG = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class RequestCancelled(Exception):
    """A request of a bind that ran out of time or gave up."""


class ReplyRefused(Exception):
    """A reply larger than its cap, or a file answer that contradicts itself."""


class RequestScope:
    """The requests of one bind's Hub work: a deadline, and the streams reading or writing now."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.cancelled = threading.Event()
        self._active: set = set()
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check(self) -> None:
        if self.cancelled.is_set() or self.remaining() <= 0:
            raise RequestCancelled("the bind's Hub deadline passed; the request was cancelled")

    def clamp(self, timeout: float | None) -> float:
        """`timeout` shortened to the deadline (at least a moment, so the check above decides)."""
        left = max(self.remaining(), 0.001)
        return left if timeout is None else min(timeout, left)

    def cancel(self) -> None:
        """Stop every request of this scope: shut down the sockets now in use, refuse new I/O."""
        self.cancelled.set()
        with self._lock:
            streams = list(self._active)
        for stream in streams:
            stream.shutdown()

    @contextlib.contextmanager
    def using(self, stream):
        with self._lock:
            self._active.add(stream)
        try:
            yield
        finally:
            with self._lock:
                self._active.discard(stream)

    def run(self, fn, *args, **kwargs):
        """`fn(*args, **kwargs)` with this scope current (in this thread and the download threads
        huggingface_hub starts from it)."""
        token = _CURRENT.set(self)
        try:
            return fn(*args, **kwargs)
        finally:
            _CURRENT.reset(token)


_CURRENT: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("kernelhub_request_scope",
                                                                               default=None)


def current_scope() -> RequestScope | None:
    return _CURRENT.get()


# -- the socket layer: deadlines and cancellation ---------------------------------------------

class _Stream:
    """An httpcore network stream whose reads and writes obey the current scope."""

    def __init__(self, inner):
        self.inner = inner

    def _io(self, op, arg, timeout):
        scope = _CURRENT.get()
        if scope is None:
            return op(arg, timeout)
        scope.check()
        with scope.using(self):
            try:
                result = op(arg, scope.clamp(timeout))
            except Exception:
                scope.check()  # a socket shut down or timed out by the deadline: say so
                raise
        if not result and scope.cancelled.is_set():
            scope.check()
        return result

    def read(self, max_bytes, timeout=None):
        return self._io(self.inner.read, max_bytes, timeout)

    def write(self, buffer, timeout=None):
        return self._io(self.inner.write, buffer, timeout)

    def close(self):
        self.inner.close()

    def start_tls(self, ssl_context, server_hostname=None, timeout=None):
        scope = _CURRENT.get()
        if scope is not None:
            scope.check()
            timeout = scope.clamp(timeout)
        return _Stream(self.inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info):
        return self.inner.get_extra_info(info)

    def shutdown(self):
        sock = self.inner.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv in another thread; close() would not


class _Backend:
    """httpcore's network backend, handing out `_Stream`s and bounding connects by the scope."""

    def __init__(self, inner):
        self.inner = inner

    def _bounded(self, connect, timeout, kwargs):
        scope = _CURRENT.get()
        if scope is not None:
            scope.check()
            timeout = scope.clamp(timeout)
        return _Stream(connect(timeout=timeout, **kwargs))

    def connect_tcp(self, host, port, timeout=None, **kwargs):
        return self._bounded(functools.partial(self.inner.connect_tcp, host, port), timeout, kwargs)

    def connect_unix_socket(self, path, timeout=None, **kwargs):
        return self._bounded(functools.partial(self.inner.connect_unix_socket, path), timeout, kwargs)

    def sleep(self, seconds):
        scope = _CURRENT.get()
        self.inner.sleep(scope.clamp(seconds) if scope is not None else seconds)


# -- the HTTP layer: size caps and self-contradicting answers -----------------------------------

def _cap(url) -> int:
    if url.path.endswith(JSON_FILES):
        return MAX_JSON_BYTES
    return MAX_DOWNLOAD_BYTES if "/resolve/" in url.path else MAX_API_BYTES


def check_file_answer(method: str, url, headers) -> None:
    """Refuse a HEAD answer for a file that gives size 0 with the hash of non-empty content:
    huggingface_hub would store an empty file under that commit without downloading anything."""
    if method != "HEAD" or "/resolve/" not in url.path:
        return
    size = headers.get("x-linked-size") or headers.get("content-length")
    etag = (headers.get("x-linked-etag") or headers.get("etag") or "").removeprefix("W/").strip('"')
    if size is not None and size.strip() == "0" and _HEX_ETAG.fullmatch(etag) and etag not in EMPTY_HASHES:
        raise ReplyRefused(f"{url} was answered with size 0 but the hash {etag} of non-empty content")


def _bounded_transport(transport):
    """Wrap an httpx2 transport: its pool's network backend obeys scopes, its replies are capped."""
    import httpx2

    pool = getattr(transport, "_pool", None)
    if pool is not None and hasattr(pool, "_network_backend"):
        pool._network_backend = _Backend(pool._network_backend)

    class CappedStream(httpx2.SyncByteStream):
        def __init__(self, inner, cap: int, url):
            self.inner, self.cap, self.url = inner, cap, url

        def __iter__(self):
            seen = 0
            for chunk in self.inner:
                seen += len(chunk)
                if seen > self.cap:
                    raise ReplyRefused(f"{self.url} sent more than {human_size(self.cap)}, the limit for such a reply")
                scope = _CURRENT.get()
                if scope is not None:
                    scope.check()  # a trickling reply stops at the deadline
                yield chunk

        def close(self):
            self.inner.close()

    class Capped(httpx2.BaseTransport):
        def handle_request(self, request):
            scope = _CURRENT.get()
            if scope is not None:
                scope.check()
                request.extensions["timeout"] = {k: scope.clamp(v) for k, v in
                                                 request.extensions.get("timeout", {}).items()}
            response = transport.handle_request(request)
            try:
                check_file_answer(request.method, request.url, response.headers)
            except ReplyRefused:
                response.close()
                raise
            response.stream = CappedStream(response.stream, _cap(request.url), request.url)
            return response

        def close(self):
            transport.close()

    return Capped()


def bounded_client(connect: float, read: float):
    """An httpx2 client for huggingface_hub: its hooks and redirects, kernelhub's bounds."""
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook

    class Client(httpx2.Client):
        def _init_transport(self, *args, **kwargs):
            return _bounded_transport(super()._init_transport(*args, **kwargs))

        def _init_proxy_transport(self, *args, **kwargs):  # $HTTPS_PROXY and friends
            return _bounded_transport(super()._init_proxy_transport(*args, **kwargs))

    return Client(event_hooks={"request": [hf_request_event_hook]}, follow_redirects=True,
                  timeout=httpx2.Timeout(read, connect=connect))


_INSTALL = threading.Lock()


def install(connect: float, read: float) -> None:
    """Make huggingface_hub use `bounded_client` (unless the user set a client factory) and run
    its download threads in the scope of the thread that started them."""
    from huggingface_hub import _snapshot_download
    from huggingface_hub.utils import _http

    with _INSTALL:
        if _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory:
            _http.set_client_factory(functools.partial(bounded_client, connect, read))
        thread_map = getattr(_snapshot_download, "hf_thread_map", None)
        if thread_map is not None and not getattr(thread_map, "_kernelhub_scoped", False):
            _snapshot_download.hf_thread_map = _scoped_thread_map(thread_map)


def _scoped_thread_map(thread_map):
    """hf_thread_map whose worker threads run in the caller's scope (contextvars do not follow
    a ThreadPoolExecutor), so a bind that gives up cancels its file downloads too."""
    @functools.wraps(thread_map)
    def scoped(fn, iterable, **kwargs):
        scope = _CURRENT.get()
        if scope is None:
            return thread_map(fn, iterable, **kwargs)
        return thread_map(lambda item: scope.run(fn, item), iterable, **kwargs)

    scoped._kernelhub_scoped = True
    return scoped
