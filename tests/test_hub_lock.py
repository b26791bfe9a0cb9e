"""Locks, offline-first loading, `kernelhub lock` / `download`, and the offline cache path."""

import json
import socket

import pytest
import torch

import kernelhub
from kernelhub.cli.commands import main
from kernelhub.registry.hub.loader import forget_loaded
from kernelhub.registry.hub.lockfile import KernelLock

ORG = "kernelhub-test"


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test: proves a path makes no request."""
    def refuse(*args):
        raise AssertionError(f"unexpected network connection to {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_lock_cli_records_commit_and_every_file_digest(hub, tmp_path, capsys):
    lock_path = tmp_path / "kernelhub.lock"
    assert main(["lock", f"{ORG}/rmsnorm@v1", f"{ORG}/layernorm@main", "-o", str(lock_path)]) == 0
    data = json.loads(lock_path.read_text())
    entry = data["kernels"][f"{ORG}/rmsnorm@v1"]
    assert entry["commit"] == hub.commits["rmsnorm"] and entry["requested"] == "v1"
    assert sorted(entry["variants"]) == ["torch-cpu", "torch-cuda", "torch-rocm", "torch-xpu"]
    files = entry["variants"]["torch-cpu"]["files"]
    assert {"metadata.json", "rmsnorm/__init__.py", "rmsnorm/_ops.py", "rmsnorm/layers.py"} <= set(files)
    assert all(len(digest) == 64 for digest in files.values())
    assert data["kernels"][f"{ORG}/layernorm@main"]["commit"] == hub.commits["layernorm"]
    assert "wrote" in capsys.readouterr().out


def test_locked_kernel_in_the_cache_loads_without_any_request(hub, tiny_checkpoint, tmp_path, monkeypatch):
    lock_path = tmp_path / "kernelhub.lock"
    assert main(["lock", f"{ORG}/rmsnorm@v1", "-o", str(lock_path)]) == 0
    assert main(["download", "--lock", str(lock_path)]) == 0
    forget_loaded()
    model = kernelhub.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        reference = model(ids).logits

    def refuse(*args):
        raise AssertionError("a locked, cached kernel must load without a network request")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": f"{ORG}/rmsnorm@v1"}, lock=lock_path)
    assert f"hub {ORG}/rmsnorm@{hub.commits['rmsnorm']} (RMSNorm)" in {e.source for e in plan.entries}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)


def test_lock_from_the_environment_and_from_a_saved_model(hub, tiny_checkpoint, tmp_path, monkeypatch):
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"RMSNorm": f"{ORG}/rmsnorm@v1"})
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    lock_path = tmp_path / "from-model.lock"
    assert main(["lock", "--from-model", str(saved), "-o", str(lock_path)]) == 0
    assert list(KernelLock.read(lock_path).entries) == [f"{ORG}/rmsnorm@v1"]
    forget_loaded()
    monkeypatch.setenv("KERNELHUB_LOCK", str(lock_path))
    # the recorded request, applied on request (a checkpoint never chooses code), verified against $KERNELHUB_LOCK
    reloaded = kernelhub.from_pretrained(saved, kernels="from_config")
    assert f"hub {ORG}/rmsnorm@{hub.commits['rmsnorm']} (RMSNorm)" in {e.source for e in reloaded.binding.entries}


def test_download_refuses_a_tampered_cache(hub, tmp_path, capsys):
    lock_path = tmp_path / "kernelhub.lock"
    assert main(["lock", f"{ORG}/silu-and-mul@v1", "-o", str(lock_path)]) == 0
    target = next((tmp_path / "hf-cache").glob("kernels--*/snapshots/*/build/torch-cuda/silu_and_mul/layers.py"))
    target.unlink()
    target.write_text("tampered = True\n")
    assert main(["download", "--lock", str(lock_path)]) == 2
    assert "torch-cuda" in capsys.readouterr().err


def test_offline_mode_uses_a_prepopulated_cache(tiny_checkpoint, offline_hub_cache, no_network):
    from tests.hub_test_kernels import HUB_KERNELS  # built once per run (conftest)

    commit = offline_hub_cache(f"{ORG}/rmsnorm", HUB_KERNELS / "rmsnorm")
    model = kernelhub.from_pretrained(tiny_checkpoint)
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": f"{ORG}/rmsnorm@v1"})
    assert f"hub {ORG}/rmsnorm@{commit} (RMSNorm)" in {e.source for e in plan.entries}
    with pytest.raises(kernelhub.BindError, match="HF_HUB_OFFLINE=1 forbids downloading"):
        kernelhub.bind(model, "sdpa", kernels={"RMSNorm": f"{ORG}/rmsnorm@v2"})


def test_hub_kernel_repo_fixture_writes_a_kernel_that_binds_by_path(hub_kernel_repo, tiny_checkpoint):
    class RMSNorm(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    repo = hub_kernel_repo("zero-norm", layers=[RMSNorm])
    model = kernelhub.from_pretrained(tiny_checkpoint)
    kernelhub.bind(model, "sdpa", kernels={"model.norm": str(repo)}, verify=False)  # zeros: wrong on purpose
    hidden = torch.randn(1, 2, 64)
    assert torch.equal(model.model.norm(hidden), torch.zeros_like(hidden))
    assert not torch.equal(model.model.layers[0].input_layernorm(hidden), torch.zeros_like(hidden))
