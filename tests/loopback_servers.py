"""Misbehaving HTTP servers on loopback for the Hub tests: one that answers every request from a
function, and helpers to forward a request to a real (loopback) Hub and change its answer.

    server = LoopbackServer(lambda request: Reply(200, body=b"{}"))
    ...                                    # server.endpoint is http://127.0.0.1:<port>
    server.close()

A `Reply` body may be bytes or an iterable of chunks (sent as they come, so a test can trickle
a reply one byte a second, or stream gigabytes without holding them).
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import threading
import time
import urllib.parse


@dataclasses.dataclass
class Reply:
    status: int = 200
    headers: dict = dataclasses.field(default_factory=dict)
    body: object = b""          # bytes, or an iterable of byte chunks
    length: int | None = None   # Content-Length to announce (default: len(body) for bytes)


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict


class LoopbackServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 answering each request with `answer(Request) -> Reply`."""

    def __init__(self, answer):
        self.answer, self.stopped, self.requests = answer, threading.Event(), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                request = Request(self.command, self.path, dict(self.headers))
                server.requests.append(request)
                reply = server.answer(request)
                body = reply.body
                length = reply.length if reply.length is not None else (len(body) if isinstance(body, bytes) else None)
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                if length is not None and not any(k.lower() == "content-length" for k in reply.headers):
                    self.send_header("Content-Length", str(length))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command == "HEAD":
                    return
                try:
                    for chunk in [body] if isinstance(body, bytes) else body:
                        if server.stopped.is_set():
                            return
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except OSError:  # the client went away: what the tests want to see
                    return

            do_GET = do_HEAD = _handle

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.stopped.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def trickle(data: bytes, every: float = 1.0, stop: threading.Event | None = None):
    """`data` one byte every `every` seconds (until `stop` is set)."""
    for i in range(len(data)):
        if stop is not None and stop.wait(every if i else 0):
            return
        if stop is None and i:
            time.sleep(every)
        yield data[i:i + 1]


def forward(endpoint: str, request: Request) -> tuple[int, dict, bytes]:
    """(status, headers, body) of `request` asked of the server at `endpoint`."""
    parts = urllib.parse.urlsplit(endpoint)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "connection", "accept-encoding")}
    conn.request(request.method, request.path, headers=headers)
    response = conn.getresponse()
    body = response.read() if request.method != "HEAD" else b""
    out = {k: v for k, v in response.getheaders() if k.lower() not in ("transfer-encoding", "connection",
                                                                       "content-length", "content-encoding")}
    length = response.getheader("content-length")
    conn.close()
    if request.method == "HEAD" and length is not None:
        out["Content-Length"] = length
    return response.status, out, body
