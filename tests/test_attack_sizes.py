"""Reads without a bound: every reply and every file kernelhub reads has a size cap, checked
before the bytes are held; a path naming a FIFO or a device is refused without reading it."""

import json
import os
import threading
import time

import psutil
import pytest

import kernelhub
from kernelhub.declare.errors import LockError, TrustConfigError, UnsafeKernelError
from kernelhub.registry.hub.loader import forget_loaded
from kernelhub.testing import point_hub_at
from tests.attack_kernels import kernel, payload, refused, variant
from tests.loopback_servers import LoopbackServer, Reply

ORG = "kernelhub-test"
GIB = 1 << 30


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


@pytest.fixture(autouse=True)
def forget():
    yield
    forget_loaded()


class PeakRSS:
    """The highest resident size of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.process, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.growth = self.peak - self.base


def test_a_gigantic_answer_to_the_reachability_probe_is_not_held(model, tmp_path, monkeypatch):
    chunk = b" " * (1 << 20)

    def answer(request):  # 1.5 GiB of JSON whitespace, streamed from one 1 MiB buffer
        return Reply(200, {"Content-Type": "application/json"}, (chunk for _ in range(1536)), length=1536 << 20)

    server = LoopbackServer(answer)
    point_hub_at(monkeypatch, server.endpoint, tmp_path / "hf-cache")
    monkeypatch.setenv("KERNELHUB_TRUSTED", ORG)
    try:
        with PeakRSS() as rss:
            refused(model, kernelhub.BindError, ["kernelhub-test/rmsnorm@v1", "more than 16 MiB"], None,
                    kernels={"RMSNorm": f"{ORG}/rmsnorm@v1"})
    finally:
        server.close()
    assert rss.growth < 100 << 20, f"peak RSS grew by {rss.growth >> 20} MiB"


def test_a_six_gib_sparse_file_in_a_kernel_is_refused_by_its_size_unread(model, tmp_path, marker):
    repo = kernel(tmp_path, "norm", init=payload(marker))
    huge = variant(repo) / "norm" / "weights.bin"
    huge.touch()
    os.truncate(huge, 6 * GIB)  # sparse: costs no disk
    start = time.monotonic()
    with PeakRSS() as rss:
        refused(model, UnsafeKernelError, ["norm/weights.bin", str(6 * GIB), "2 GiB limit"], marker,
                kernels={"RMSNorm": str(repo)})
    assert time.monotonic() - start < 5 and rss.growth < 100 << 20


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "directory", "sparse 6 GiB"])
def test_a_lock_path_that_is_not_a_small_regular_file_is_refused_without_reading_it(model, tmp_path, kind):
    path = {"fifo": tmp_path / "lock.fifo", "/dev/zero": "/dev/zero", "directory": tmp_path,
            "sparse 6 GiB": tmp_path / "big.lock"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    if kind == "sparse 6 GiB":
        path.touch()
        os.truncate(path, 6 * GIB)
    phrase = {"fifo": "not a regular file", "/dev/zero": "not a regular file", "directory": "is a directory",
              "sparse 6 GiB": "the limit is 16 MiB"}[kind]
    outcome = {}

    def bind():  # in a thread: a FIFO opened for reading would block this test forever
        try:
            refused(model, LockError, [str(path), phrase], None, lock=path)
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    worker = threading.Thread(target=bind, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"reading a {kind} as the lock file hung"
    assert outcome.get("ok"), outcome.get("error")


def test_oversized_metadata_and_trust_config_are_refused_by_size(model, tmp_path, marker, monkeypatch):
    repo = kernel(tmp_path, "norm", init=payload(marker))
    meta = variant(repo) / "metadata.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "padding": " " * (2 << 20)}))
    refused(model, kernelhub.BindError, ["metadata.json is", "the limit is 1 MiB"], marker,
            kernels={"RMSNorm": str(repo)})
    config = tmp_path / "config.toml"
    config.touch()
    os.truncate(config, 2 * GIB)
    monkeypatch.setenv("KERNELHUB_CONFIG", str(config))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(model, TrustConfigError, [str(config), "the limit is 1 MiB"], marker,
            kernels={"RMSNorm": "someone/norm@v1"})


@pytest.mark.parametrize("kind", ["fifo", "sparse 6 GiB"])
def test_a_metadata_json_that_is_a_fifo_or_huge_is_refused_before_kernels_reads_it(model, tmp_path, marker, kind):
    repo = kernel(tmp_path, "norm", init=payload(marker))
    meta = variant(repo) / "metadata.json"
    meta.unlink()
    if kind == "fifo":
        os.mkfifo(meta)
    else:
        meta.touch()
        os.truncate(meta, 6 * GIB)
    outcome = {}

    def bind():  # in a thread: `kernels` opening a FIFO for reading would block forever
        try:
            refused(model, kernelhub.BindError, ["metadata.json", "not a regular file" if kind == "fifo"
                                                 else "the limit is 1 MiB"], marker, kernels={"RMSNorm": str(repo)})
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    worker = threading.Thread(target=bind, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), f"a {kind} metadata.json hung the bind"
    assert outcome.get("ok"), outcome.get("error")
