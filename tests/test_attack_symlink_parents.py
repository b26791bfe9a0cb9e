"""Symlinks above the files, or put there while a bind runs: every path under a kernel is opened
from the directory above it without following links, so a linked `build/` or variant folder is
refused with its location, and a folder swapped after it was opened is never read."""

import os
import shutil

import pytest
import torch

import kernelhub
from kernelhub.registry.hub import loader
from kernelhub.registry.hub.loader import forget_loaded
from kernelhub.registry.hub.locking import lock_kernels
from kernelhub.registry.hub.snapshot import UnsafeKernelError
from kernelhub.testing import point_hub_at
from tests.attack_kernels import TRUSTED, cached_variant, kernel, payload, refused, to_cache, variant


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


@pytest.fixture(autouse=True)
def forget():
    yield
    forget_loaded()


def evil_copy(real_variant, where, marker):
    """A copy of a variant folder whose package writes `marker` on import."""
    shutil.copytree(real_variant, where)
    init = where / "norm" / "__init__.py"
    init.write_text(init.read_text() + payload(marker))
    return where


def test_a_build_folder_that_is_a_symlink_is_refused(model, tmp_path, marker):
    repo = kernel(tmp_path, "norm")
    evil_build = tmp_path / "evil-build"
    evil_build.mkdir()
    evil_copy(variant(repo), evil_build / "torch-cpu", marker)
    shutil.rmtree(repo / "build")
    (repo / "build").symlink_to(evil_build, target_is_directory=True)
    refused(model, UnsafeKernelError, ["'build' is a symlink", str(evil_build)], marker,
            kernels={"RMSNorm": str(repo)})


def test_a_cache_snapshot_whose_build_is_a_symlink_is_refused(model, tmp_path, marker, monkeypatch):
    cache = tmp_path / "hf-cache"
    point_hub_at(monkeypatch, None, cache, offline=True)
    monkeypatch.setenv("KERNELHUB_TRUSTED", TRUSTED)
    to_cache(cache, f"{TRUSTED}/norm", kernel(tmp_path, "norm"))
    real = cached_variant(cache, f"{TRUSTED}/norm")
    evil_build = tmp_path / "evil-build"
    evil_build.mkdir()
    evil_copy(real, evil_build / "torch-cpu", marker)
    snapshot = real.parents[1]
    shutil.rmtree(snapshot / "build")
    (snapshot / "build").symlink_to(evil_build, target_is_directory=True)
    where = f"snapshots/{snapshot.name}/build' is a symlink"
    refused(model, UnsafeKernelError, [where, str(evil_build)], marker, kernels={"RMSNorm": f"{TRUSTED}/norm@v1"})
    with pytest.raises(UnsafeKernelError, match=where):
        lock_kernels([f"{TRUSTED}/norm@v1"])
    assert not marker.exists()


def _swap_after_resolving(monkeypatch, swap):
    """Run `swap(variant path)` after kernels picked the variant and before kernelhub reads it."""
    real = loader.local_variant_path

    def resolved(path, backend):
        found = real(path, backend)
        swap(found)
        return found

    monkeypatch.setattr(loader, "local_variant_path", resolved)


def test_a_variant_folder_swapped_for_a_symlink_before_it_is_read_is_refused(model, tmp_path, marker, monkeypatch):
    repo = kernel(tmp_path, "norm")
    evil = evil_copy(variant(repo), tmp_path / "evil-variant", marker)

    def swap(found):
        os.rename(found, tmp_path / "real-variant")
        found.symlink_to(evil, target_is_directory=True)

    _swap_after_resolving(monkeypatch, swap)
    refused(model, UnsafeKernelError, ["build/torch-cpu' is a symlink", str(evil)], marker,
            kernels={"RMSNorm": str(repo)})


def test_a_build_folder_swapped_for_a_symlink_before_it_is_read_is_refused(model, tmp_path, marker, monkeypatch):
    repo = kernel(tmp_path, "norm")
    evil_build = tmp_path / "evil-build"
    evil_build.mkdir()
    evil_copy(variant(repo), evil_build / "torch-cpu", marker)

    def swap(found):
        os.rename(found.parent, tmp_path / "real-build")
        found.parent.symlink_to(evil_build, target_is_directory=True)

    _swap_after_resolving(monkeypatch, swap)
    refused(model, UnsafeKernelError, ["'build' is a symlink", str(evil_build)], marker,
            kernels={"RMSNorm": str(repo)})


def test_a_variant_folder_swapped_while_it_is_read_is_never_followed(model, tmp_path, marker, monkeypatch):
    """The swap lands after the folder was opened: what is read, hashed and imported is the
    folder that was opened, not what its path names now."""
    repo = kernel(tmp_path, "norm")
    target = variant(repo)
    evil = evil_copy(target, tmp_path / "evil-variant", marker)
    real_scandir, swapped = os.scandir, []

    def scandir(path="."):
        named = os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else os.fspath(path)
        if not swapped and named == str(target):
            os.rename(target, tmp_path / "real-variant")
            target.symlink_to(evil, target_is_directory=True)
            swapped.append(True)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ids = torch.randint(0, 100, (1, 5))
    reference = model(ids).logits
    kernelhub.bind(model, "sdpa", kernels={"RMSNorm": str(repo)})
    monkeypatch.undo()
    assert swapped, "the swap never happened"
    assert not marker.exists(), "the swapped-in folder was imported"
    torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)
