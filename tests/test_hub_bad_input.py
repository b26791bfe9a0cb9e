"""Bad Hub kernel requests: a clear error (or, inside a chain, a recorded fallback), the
model and the registry exactly as they were."""

import json
import time

import pytest

import kernelhub
from kernelhub.registry.hub.lockfile import LockError
from kernelhub.registry.hub.trust import UntrustedKernelError
from kernelhub.testing import point_hub_at
from tests.unchanged import refused

ORG = "kernelhub-test"


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


@pytest.mark.parametrize("ref, phrase", [
    ("org/", "the name is empty"),
    ("/name", "does not exist"),
    ("org/name@", "'@' is not followed by a revision"),
    ("org/name:", "':' is not followed by a symbol"),
    ("org/name@v1:", "':' is not followed by a symbol"),
    ("org//name", "exactly 'org/name'"),
    ("org/name/extra@v1", "exactly 'org/name'"),
    ("org/na me@v1", "whitespace"),
    ("org/name@v1@v2", "more than one '@'"),
    ("org/name:Bad-Symbol", "not a Python identifier"),
    ("-org/name@v1", "the org '-org'"),
    ("org/name--x@v1", "without '--'"),
    ("org/name@v1~2", "characters a Hub revision cannot have"),
    ("@v1:RMSNorm", "exactly 'org/name'"),
])
def test_malformed_refs_are_refused_before_any_request(model, ref, phrase):
    refused(model, kernelhub.KernelhubError, [phrase, "Expected 'org/name[@rev][:Symbol]'"]
            if "does not exist" not in phrase else [phrase], kernels={"RMSNorm": ref})


def test_malformed_attention_ref_is_refused(model):
    refused(model, kernelhub.KernelhubError, ["attn_implementation", "more than one '@'"], attn="org/a@v1@v2:fn")


def test_untrusted_org_is_refused_with_the_setting_to_change(model, hub, monkeypatch):
    import socket

    def no_network(*args):
        raise AssertionError("an untrusted repo must be refused before any request")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    message = refused(model, UntrustedKernelError, ["'stranger/rmsnorm' is not trusted", "KERNELHUB_TRUSTED=stranger",
                                                    "config.toml"], kernels={"RMSNorm": "stranger/rmsnorm@v1"})
    assert "none of its code was downloaded or imported" in message


@pytest.mark.parametrize("repo, phrases", [
    ("missing-layer", ["has no layer 'RMSNorm'", "layers: NotRMSNorm"]),
    ("bad-signature", ["forward(self, x, residual) does not match RMSNorm.forward(self, x)"]),
    ("import-error", ["failed to import", "ImportError: libmissing.so"]),
    ("newer-kernels", ["requires kernels>=99.0.0", "0.17"]),
    ("cuda-only", ["no build variant for this platform", "torch-cuda"]),
    ("does-not-exist", ["no kernel repo 'kernelhub-test/does-not-exist'"]),
])
def test_broken_kernels_are_clear_errors_and_recorded_fallbacks(model, hub, repo, phrases):
    ref = f"{ORG}/{repo}@v1"
    refused(model, kernelhub.BindError, phrases, kernels={"RMSNorm": ref})
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": [ref, "reference"]})
    entry = next(e for e in plan.entries if e.path.endswith("input_layernorm"))
    assert entry.chosen == "reference"
    assert all(p in " ".join(entry.rejected[0][1]) for p in phrases)


def test_missing_revision_is_a_clear_error(model, hub):
    refused(model, kernelhub.BindError, ["Version 7 not found, available versions: 1"],
            kernels={"RMSNorm": f"{ORG}/rmsnorm@v7"})


def test_unreachable_hub_with_nothing_cached_fails_fast(model, hub, monkeypatch, tmp_path):
    import socket
    import threading

    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    threading.Thread(target=lambda: [silent.accept() for _ in range(8)], daemon=True).start()
    for endpoint in ("http://127.0.0.1:9", f"http://127.0.0.1:{silent.getsockname()[1]}"):
        point_hub_at(monkeypatch, endpoint, tmp_path / "empty-cache")
        start = time.monotonic()
        refused(model, kernelhub.BindError,
                ["is unreachable", endpoint, "not in the local cache", "kernelhub download"],
                kernels={"RMSNorm": f"{ORG}/rmsnorm@v1"})
        assert time.monotonic() - start < 3.5, endpoint
    silent.close()


def test_tampered_file_under_a_lock_is_refused_before_import(model, hub, tmp_path):
    from kernelhub.registry.hub.locking import lock_kernels
    from kernelhub.registry.hub.loader import forget_loaded

    lock_path = tmp_path / "kernelhub.lock"
    lock_kernels([f"{ORG}/rmsnorm@v1"]).write(lock_path)
    kernelhub.bind(model, "sdpa", kernels={"RMSNorm": f"{ORG}/rmsnorm@v1"}, lock=lock_path)  # downloads it
    forget_loaded()
    kernelhub.unbind(model)
    cache = next((tmp_path / "hf-cache").glob("kernels--*rmsnorm/snapshots/*/build/torch-cpu/rmsnorm/_ops.py"))
    cache.write_text(cache.read_text() + "\nprint('injected')\n")
    refused(model, LockError, ["does not match the lock", "changed: rmsnorm/_ops.py", "was not imported"],
            kernels={"RMSNorm": f"{ORG}/rmsnorm@v1"}, lock=lock_path)
    data = json.loads(lock_path.read_text())
    assert list(data["kernels"]) == [f"{ORG}/rmsnorm@v1"]


def test_ref_missing_from_the_lock_is_refused(model, hub, tmp_path):
    from kernelhub.registry.hub.locking import lock_kernels

    lock_kernels([f"{ORG}/rmsnorm@v1"]).write(tmp_path / "kernelhub.lock")
    refused(model, LockError, ["kernelhub-test/layernorm@v1 is not in the lock", "kernelhub lock"],
            kernels={"RMSNorm": f"{ORG}/layernorm@v1"}, lock=tmp_path / "kernelhub.lock")
