"""Attacks on the bytes between verification and import: planted bytecode, symlinks, files
swapped after the check, tampered private copies. What runs is what was hashed."""

import builtins
import os
import socket
import sys

import pytest
import torch

import kernelhub
from kernelhub.cli.commands import main
from kernelhub.registry.hub import loader
from kernelhub.registry.hub.loader import forget_loaded
from kernelhub.registry.hub.locking import lock_kernels
from kernelhub.registry.hub.lockfile import LockError
from kernelhub.registry.hub.snapshot import Snapshot, UnsafeKernelError
from kernelhub.registry.hub.store import verified_copy
from kernelhub.testing import point_hub_at
from tests.attack_kernels import TRUSTED, cached_variant, kernel, payload, plant_pyc, refused, to_cache, variant


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


@pytest.fixture
def locked(tmp_path, monkeypatch):
    """A trusted kernel in an offline HF cache, locked; returns (cached variant dir, lock path)."""
    cache = tmp_path / "hf-cache"
    point_hub_at(monkeypatch, None, cache, offline=True)
    monkeypatch.setenv("KERNELHUB_TRUSTED", TRUSTED)
    to_cache(cache, f"{TRUSTED}/norm", kernel(tmp_path, "norm"))
    lock_path = tmp_path / "kernelhub.lock"
    lock_kernels([f"{TRUSTED}/norm@v1"], path=lock_path).write(lock_path)
    yield cached_variant(cache, f"{TRUSTED}/norm"), lock_path
    forget_loaded()


HUB = {"RMSNorm": f"{TRUSTED}/norm@v1"}


# -- bytecode --------------------------------------------------------------------------

def test_planted_pyc_with_a_copied_header_in_a_local_kernel_is_refused(model, tmp_path, marker):
    repo = kernel(tmp_path, "norm")
    plant_pyc(variant(repo) / "norm" / "layers.py", payload(marker))
    refused(model, UnsafeKernelError, ["norm/__pycache__", "bytecode", "none of it was imported"], marker,
            kernels={"RMSNorm": str(repo)})


def test_planted_pyc_in_a_locked_cached_kernel_is_refused(model, locked, marker):
    path, lock_path = locked
    plant_pyc(path / "norm" / "layers.py", payload(marker))
    refused(model, UnsafeKernelError, ["__pycache__", "bytecode"], marker, kernels=HUB, lock=lock_path)


def test_pyc_only_package_directory_is_refused(model, tmp_path, marker):
    repo = kernel(tmp_path, "norm")
    package = variant(repo) / "norm" / "extra"
    package.mkdir()
    (package / "__init__.pyc").write_bytes(b"\x00" * 16)
    refused(model, UnsafeKernelError, ["extra/__init__.pyc", "bytecode"], marker, kernels={"RMSNorm": str(repo)})


def test_pyc_only_layers_directory_in_a_locked_kernel_is_refused(model, locked, marker):
    path, lock_path = locked
    (path / "norm" / "layers").mkdir()
    source = path / "norm" / "layers.py"
    compiled = compile(payload(marker), str(source), "exec")
    import importlib._bootstrap_external as bootstrap
    (path / "norm" / "layers" / "__init__.pyc").write_bytes(bytes(bootstrap._code_to_timestamp_pyc(compiled, 0, 0)))
    refused(model, UnsafeKernelError, ["layers/__init__.pyc"], marker, kernels=HUB, lock=lock_path)


# -- symlinks and special files -----------------------------------------------------------

def test_symlinked_file_in_a_local_kernel_is_refused(model, tmp_path, marker):
    repo = kernel(tmp_path, "norm")
    evil = tmp_path / "elsewhere.py"
    evil.write_text(payload(marker))
    layers = variant(repo) / "norm" / "layers.py"
    layers.unlink()
    layers.symlink_to(evil)
    refused(model, UnsafeKernelError, ["norm/layers.py", "symlink", str(evil)], marker,
            kernels={"RMSNorm": str(repo)})


def test_symlinked_directory_inside_the_tree_is_refused(model, tmp_path, marker):
    repo = kernel(tmp_path, "norm")
    (variant(repo) / "norm" / "again").symlink_to(variant(repo) / "norm", target_is_directory=True)
    refused(model, UnsafeKernelError, ["norm/again", "symlink"], marker, kernels={"RMSNorm": str(repo)})


def test_symlinked_directory_outside_the_tree_is_refused(model, tmp_path, marker):
    repo = kernel(tmp_path, "norm")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "__init__.py").write_text(payload(marker))
    (variant(repo) / "norm" / "layers.py").unlink()
    (variant(repo) / "norm" / "layers").symlink_to(elsewhere, target_is_directory=True)
    refused(model, UnsafeKernelError, ["norm/layers", "symlink"], marker, kernels={"RMSNorm": str(repo)})


def test_cache_symlink_out_of_the_blob_store_is_refused(model, locked, tmp_path, marker):
    path, lock_path = locked
    evil = tmp_path / "evil_layers.py"
    evil.write_text(payload(marker))
    (path / "norm" / "layers.py").unlink()
    (path / "norm" / "layers.py").symlink_to(evil)
    refused(model, UnsafeKernelError, ["norm/layers.py", "symlink to", str(evil)], marker, kernels=HUB, lock=lock_path)


def test_symlinked_variant_directory_is_refused(model, tmp_path, marker):
    repo = kernel(tmp_path, "norm", init=payload(marker))
    real = tmp_path / "real-variant"
    os.rename(variant(repo), real)
    variant(repo).symlink_to(real, target_is_directory=True)
    refused(model, UnsafeKernelError, ["torch-cpu", "symlink"], marker, kernels={"RMSNorm": str(repo)})


def test_fifo_in_a_kernel_is_refused(model, tmp_path, marker):
    repo = kernel(tmp_path, "norm", init=payload(marker))
    os.mkfifo(variant(repo) / "norm" / "pipe")
    refused(model, UnsafeKernelError, ["norm/pipe", "not a regular file"], marker, kernels={"RMSNorm": str(repo)})


# -- swapped after verification -------------------------------------------------------------

def _swap_before_copy(monkeypatch, target, evil_source):
    """Rewrite `target` right after kernelhub verified it and before it is stored or imported."""
    real = loader.verified_copy

    def swapped(snapshot):
        target.chmod(0o644)
        target.write_text(evil_source)
        return real(snapshot)

    monkeypatch.setattr(loader, "verified_copy", swapped)


def test_local_file_swapped_after_verification_never_runs(model, tmp_path, marker, monkeypatch):
    repo = kernel(tmp_path, "norm")
    layers = variant(repo) / "norm" / "layers.py"
    original = layers.read_text()
    _swap_before_copy(monkeypatch, layers, original + "\n" + payload(marker))
    ids = torch.randint(0, 100, (1, 5))
    reference = model(ids).logits
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": str(repo)})
    assert layers.read_text() != original  # the swap happened
    assert not marker.exists(), "the swapped-in file was imported"
    assert any(e.source.startswith("local ") for e in plan.entries)
    torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)


def test_cached_file_swapped_after_lock_verification_never_runs(model, locked, marker, monkeypatch):
    path, lock_path = locked
    init = path / "norm" / "__init__.py"
    _swap_before_copy(monkeypatch, init, init.read_text() + payload(marker))
    kernelhub.bind(model, "sdpa", kernels=HUB, lock=lock_path)
    assert payload(marker) in init.read_text()
    assert not marker.exists()


def test_private_copy_tampered_before_import_never_runs(model, tmp_path, marker, monkeypatch):
    from kernelhub.registry.hub import importer

    repo = kernel(tmp_path, "norm")
    real = loader.import_variant

    def tamper(snapshot, python_name, copy, *args):
        target = copy / "norm" / "__init__.py"
        target.chmod(0o644)
        target.write_text(payload(marker))
        return real(snapshot, python_name, copy, *args)

    monkeypatch.setattr(loader, "import_variant", tamper)
    kernelhub.bind(model, "sdpa", kernels={"RMSNorm": str(repo)})
    assert not marker.exists()
    verified = loader.verify(kernelhub.registry.hub.ref.parse_kernel_ref(str(repo), "test"), "cpu", None)
    assert importer.module_name("norm", verified.closure_key) in sys.modules


def test_a_module_missing_from_the_verified_bytes_is_never_looked_up_on_disk(model, tmp_path, marker):
    lazy = "def later():\n    from . import extra\n    return extra\n"
    repo = kernel(tmp_path, "norm", init=lazy)
    kernelhub.bind(model, "sdpa", kernels={"RMSNorm": str(repo)})
    ref = kernelhub.registry.hub.ref.parse_kernel_ref(str(repo), "test")
    loaded = loader.load_kernel(ref, torch.device("cpu"))
    package = os.path.dirname(loaded.module.__file__)
    os.chmod(package, 0o755)
    with open(os.path.join(package, "extra.py"), "w") as f:  # planted in the private copy after the import
        f.write(payload(marker))
    with pytest.raises(ImportError, match="cannot import name 'extra'"):
        loaded.module.later()
    assert not marker.exists()


def test_verified_copies_live_in_the_one_kernelhub_cache_xdg_included(tmp_path, monkeypatch):
    """The store, GGUF conversions and compiled CPU kernels share one cache root: with KERNELHUB_CACHE
    unset, $XDG_CACHE_HOME decides it for all three."""
    from kernelhub.declare.cache_dir import cache_root

    monkeypatch.delenv("KERNELHUB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    copy = verified_copy(Snapshot(tmp_path, {"metadata.json": b"{}"}))
    assert copy.parent == tmp_path / "xdg" / "kernelhub" / "verified" == cache_root() / "verified"


def test_private_copy_is_reverified_on_reuse_and_never_rewritten(tmp_path, monkeypatch):
    """A damaged copy is left for whoever may be using it; a fresh one is published beside it."""
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path / "cache"))  # its damaged copies stay in there
    snapshot = Snapshot(tmp_path, {"pkg/__init__.py": b"X = 1\n", "metadata.json": b"{}"})
    copy = verified_copy(snapshot)
    assert (copy / "pkg" / "__init__.py").stat().st_mode & 0o222 == 0  # read-only
    (copy / "pkg" / "__init__.py").chmod(0o644)
    (copy / "pkg" / "__init__.py").write_text("X = 2\n")
    again = verified_copy(snapshot)
    assert again != copy and (again / "pkg" / "__init__.py").read_bytes() == b"X = 1\n"
    assert (copy / "pkg" / "__init__.py").read_text() == "X = 2\n"  # not deleted under another process
    assert verified_copy(snapshot) == again  # the intact copy is found and reused
    (again / "pkg").chmod(0o755)
    (again / "pkg" / "__pycache__").mkdir()
    third = verified_copy(snapshot)
    assert third not in (copy, again) and (third / "pkg" / "__init__.py").read_bytes() == b"X = 1\n"
    assert not (third / "pkg" / "__pycache__").exists()


def test_no_bytecode_is_written_for_imported_kernels(model, tmp_path):
    repo = kernel(tmp_path, "norm")
    kernelhub.bind(model, "sdpa", kernels={"RMSNorm": str(repo)})
    root = os.environ["KERNELHUB_CACHE"]
    assert not [p for p in os.walk(root) if "__pycache__" in p[0]]
    assert not list(repo.rglob("__pycache__"))


# -- one import per kernel ----------------------------------------------------------------

def test_one_local_directory_spelled_four_ways_is_imported_once(tmp_path, tiny_checkpoint, monkeypatch):
    counted = "import builtins\nbuiltins.__dict__.setdefault('_kernelhub_spellings', []).append(1)\n"
    repo = kernel(tmp_path, "norm", init=counted)
    (tmp_path / "link").symlink_to(repo, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    builtins.__dict__.pop("_kernelhub_spellings", None)
    spellings = ["./norm", str(repo), "./norm/../norm", "./link"]
    sources = set()
    for spelling in spellings:
        model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"RMSNorm": spelling})
        sources |= {e.source for e in model.binding.entries if "RMSNorm" in e.source}
    assert builtins.__dict__["_kernelhub_spellings"] == [1]
    forget_loaded()


# -- local locks and lock --check -----------------------------------------------------------

def test_locked_local_directory_is_verified(model, tmp_path, marker, monkeypatch):
    monkeypatch.chdir(tmp_path)
    repo = kernel(tmp_path, "norm")
    assert main(["lock", "./norm", "-o", "kernelhub.lock"]) == 0
    kernelhub.bind(model, "sdpa", kernels={"RMSNorm": "./norm"}, lock="kernelhub.lock")
    forget_loaded()
    init = variant(repo) / "norm" / "__init__.py"
    init.write_text(init.read_text() + payload(marker))
    refused(model, LockError, ["./norm (torch-cpu) does not match the lock", "changed: norm/__init__.py"], marker,
            kernels={"RMSNorm": "./norm"}, lock="kernelhub.lock")


def test_lock_offline_pins_the_cache_and_check_finds_tampering_without_importing(locked, marker, capsys, monkeypatch):
    path, lock_path = locked
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("network")))
    assert main(["lock", "--check", "-o", str(lock_path)]) == 0
    assert "torch-cpu: ok" in capsys.readouterr().out
    init = path / "norm" / "__init__.py"
    init.write_text(init.read_text() + payload(marker))
    assert main(["lock", "--check", "-o", str(lock_path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM" in out and "changed: norm/__init__.py" in out and "does not match" in out
    assert not marker.exists()
