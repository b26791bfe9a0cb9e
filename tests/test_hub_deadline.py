"""No Hub can hang a bind: a deadline per bind, no lock held across network I/O, and an
endpoint found unreachable is not asked again within the same bind."""

import socket
import threading
import time

import pytest

import kernelhub
from kernelhub.declare.errors import KernelhubError
from kernelhub.testing import point_hub_at
from tests.attack_kernels import kernel
from tests.unchanged import assert_unchanged, snapshot

ORG = "kernelhub-test"


class StallingHub:
    """A loopback HTTP server that answers the first `answers` requests with `{}` and then
    accepts connections and never answers, until stopped."""

    def __init__(self, answers: int):
        self.answers, self.stop, self.answered = answers, threading.Event(), threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            conn.settimeout(0.2)
            data = b""
            while b"\r\n\r\n" not in data and not self.stop.is_set():
                try:
                    data += conn.recv(4096) or b""
                except OSError:
                    continue
            if self.answers > 0:
                self.answers -= 1
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\n{}")
                self.answered.set()
                return
            self.stop.wait()  # stall

    def close(self):
        self.stop.set()
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


@pytest.fixture
def trusted(monkeypatch):
    monkeypatch.setenv("KERNELHUB_TRUSTED", ORG)


def test_hub_that_answers_the_probe_then_stalls_fails_within_the_deadline_without_blocking_others(
        model, tiny_checkpoint, tmp_path, monkeypatch, trusted):
    server = StallingHub(answers=1)
    point_hub_at(monkeypatch, server.endpoint, tmp_path / "hf-cache")
    monkeypatch.setenv("KERNELHUB_HUB_TIMEOUT", "2")
    local = kernel(tmp_path, "norm")
    other = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    outcome = {}

    def stalled_bind():
        start = time.monotonic()
        try:
            kernelhub.bind(model, "sdpa", kernels={"RMSNorm": f"{ORG}/rmsnorm@v1"})
        except KernelhubError as e:
            outcome["error"] = str(e)
        outcome["seconds"] = time.monotonic() - start

    before = snapshot(model)
    try:
        worker = threading.Thread(target=stalled_bind)
        worker.start()
        assert server.answered.wait(5), "the probe never reached the server"
        start = time.monotonic()
        plan = kernelhub.bind(other, "sdpa", kernels={"RMSNorm": str(local)})  # while the other bind hangs
        local_seconds = time.monotonic() - start
        worker.join(15)
    finally:
        server.close()
    assert local_seconds < 5, f"a local bind waited {local_seconds:.1f} s behind a stalled Hub"
    assert any(e.source.startswith("local ") for e in plan.entries)
    assert outcome["seconds"] < 2 + 1.5, outcome
    for phrase in (f"{ORG}/rmsnorm@v1", server.endpoint, "2 s deadline", "KERNELHUB_HUB_TIMEOUT"):
        assert phrase in outcome["error"], outcome["error"]
    assert_unchanged(model, before)


def test_three_unreachable_refs_in_a_chain_cost_about_one_timeout(model, tmp_path, monkeypatch, trusted):
    server = StallingHub(answers=0)
    point_hub_at(monkeypatch, server.endpoint, tmp_path / "hf-cache")
    local = kernel(tmp_path, "norm")
    chain = [f"{ORG}/rmsnorm@v1", f"{ORG}/layernorm@v1", f"{ORG}/counted@v1", str(local)]
    try:
        start = time.monotonic()
        plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": chain})
        seconds = time.monotonic() - start
    finally:
        server.close()
    assert seconds < 5, f"{seconds:.1f} s: each unreachable ref paid its own timeout"
    entry = next(e for e in plan.entries if e.path.endswith("input_layernorm"))
    assert entry.source.startswith("local ")
    reasons = [" ".join(r) for _, r in entry.rejected]
    assert len(reasons) == 3 and "is unreachable" in reasons[0]
    assert all("found unreachable earlier in this bind" in r for r in reasons[1:])


@pytest.mark.parametrize("value", ["abc", "-1", "0", "inf", "nan", "3s"])
def test_bad_hub_timeout_is_a_clear_error(model, tmp_path, monkeypatch, trusted, value):
    monkeypatch.setenv("KERNELHUB_HUB_TIMEOUT", value)
    before = snapshot(model)
    with pytest.raises(KernelhubError, match=f"KERNELHUB_HUB_TIMEOUT='{value}' is not a number of seconds"):
        kernelhub.bind(model, "sdpa", kernels={"RMSNorm": str(kernel(tmp_path, "norm"))})
    assert_unchanged(model, before)
