"""Requests never outlive their bind: a Hub that sends one byte a second is given up at the
deadline, and within a second nothing of the bind is left (no worker thread, no socket, no
huggingface_hub file lock); the same kernel then binds from a healthy Hub, here and in a
second process."""

import os
import subprocess
import sys
import threading
import time

import filelock
import psutil
import pytest
import torch

import kernelhub
from kernelhub.declare.errors import KernelhubError
from kernelhub.registry.hub.loader import forget_loaded, load_kernel
from kernelhub.registry.hub.ref import parse_kernel_ref
from kernelhub.testing import point_hub_at
from tests.loopback_servers import LoopbackServer, Reply, forward, trickle
from tests.unchanged import assert_unchanged, snapshot

ORG = "kernelhub-test"
DEADLINE = 3


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


def hub_workers():
    return [t for t in threading.enumerate() if t.name.startswith("kernelhub-hub")]


def client_sockets(port: int):
    process = psutil.Process()
    connections = getattr(process, "net_connections", process.connections)  # psutil < 6 names it connections
    return [c for c in connections(kind="tcp") if c.raddr and c.raddr.port == port]


def held_locks(cache):
    held = []
    for path in cache.glob(".locks/**/*.lock"):
        lock = filelock.FileLock(path)
        try:
            lock.acquire(timeout=0)
            lock.release()
        except filelock.Timeout:
            held.append(path)
    return held


def bind_until_refused(model, ref):
    before = snapshot(model)
    start = time.monotonic()
    with pytest.raises(KernelhubError) as info:
        kernelhub.bind(model, "sdpa", kernels={"RMSNorm": ref})
    assert_unchanged(model, before)
    return str(info.value), time.monotonic() - start


def test_a_hub_trickling_its_first_answer_is_given_up_with_nothing_left(model, tmp_path, monkeypatch):
    server = LoopbackServer(lambda request: Reply(200, {"Content-Type": "application/json"},
                                                  trickle(b"{" + b" " * 100 + b"}", stop=stopped), length=102))
    stopped = server.stopped
    point_hub_at(monkeypatch, server.endpoint, tmp_path / "hf-cache")
    monkeypatch.setenv("KERNELHUB_TRUSTED", ORG)
    monkeypatch.setenv("KERNELHUB_HUB_TIMEOUT", str(DEADLINE))
    try:
        message, seconds = bind_until_refused(model, f"{ORG}/rmsnorm@v1")
        assert seconds < DEADLINE + 1, f"the bind gave up after {seconds:.1f} s"
        assert f"{DEADLINE} s deadline" in message and server.endpoint in message
        assert not hub_workers(), "a worker thread outlived the bind"
        assert not client_sockets(server.port), "a socket outlived the bind"
    finally:
        server.close()


def test_a_download_trickling_after_the_deadline_leaves_no_thread_socket_or_file_lock(
        model, hub, tmp_path, monkeypatch):
    """A proxy of the loopback Hub that sends file contents one byte a second: the bind gives up
    holding huggingface_hub's lock for that file, and must let go of it."""
    def answer(request):
        status, headers, body = forward(hub.endpoint, request)
        if request.method == "GET" and "/resolve/" in request.path:
            return Reply(status, headers, trickle(body, stop=proxy.stopped), length=len(body))
        return Reply(status, headers, body)

    proxy = LoopbackServer(answer)
    cache = tmp_path / "hf-cache"
    point_hub_at(monkeypatch, proxy.endpoint, cache)
    monkeypatch.setenv("KERNELHUB_HUB_TIMEOUT", str(DEADLINE))
    ref = f"{ORG}/rmsnorm@v1"
    try:
        message, seconds = bind_until_refused(model, ref)
        assert any("/resolve/" in r.path and r.method == "GET" for r in proxy.requests), "no download was trickled"
        assert seconds < DEADLINE + 1, f"the bind gave up after {seconds:.1f} s"
        assert f"{DEADLINE} s deadline" in message
        assert not hub_workers(), "a worker thread outlived the bind"
        assert not client_sockets(proxy.port), "a socket outlived the bind"
        assert list(cache.glob(".locks/**/*.lock")), "huggingface_hub took no file lock"
        assert not held_locks(cache), "a huggingface_hub file lock outlived the bind"
    finally:
        proxy.close()

    point_hub_at(monkeypatch, hub.endpoint, cache)  # the healthy Hub, same cache
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "KERNELHUB_TRUSTED": ORG,
           "KERNELHUB_HUB_TIMEOUT": "60"}
    script = ("import torch; from kernelhub.registry.hub.loader import load_kernel; "
              "from kernelhub.registry.hub.ref import parse_kernel_ref; "
              f"print(load_kernel(parse_kernel_ref({ref!r}, 'test'), torch.device('cpu')).source)")
    second = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": ref})
    out, err = second.communicate(timeout=120)
    commit = hub.commits["rmsnorm"]
    assert f"hub {ORG}/rmsnorm@{commit} (RMSNorm)" in {e.source for e in plan.entries}
    assert second.returncode == 0 and out.strip() == f"hub {ORG}/rmsnorm@{commit}", err[-2000:]
    forget_loaded()
    loaded = load_kernel(parse_kernel_ref(ref, "test"), torch.device("cpu"))
    assert loaded.source == f"hub {ORG}/rmsnorm@{commit}"
