"""Attacks through the shape of `kernel-depends`: a diamond whose paths double at every level,
and chains too deep to follow. Every kernel of a graph is read once per bind and once per
`kernelhub lock`; a chain past the depth limit is refused, naming it."""

import collections
import time

import pytest
import torch

import kernelhub
from kernelhub.registry.hub import loader, locking
from kernelhub.registry.hub.depends import MAX_DEPTH
from kernelhub.registry.hub.fetch import HubKernelError
from kernelhub.registry.hub.loader import forget_loaded, load_kernel
from kernelhub.registry.hub.locking import lock_kernels
from kernelhub.registry.hub.lockfile import KernelLock
from kernelhub.registry.hub.ref import parse_kernel_ref
from kernelhub.testing import point_hub_at
from tests.attack_kernels import TRUSTED, dependency_chain, diamond, refused

LEVELS = 14
REACHED = 1 + 2 * (LEVELS - 1)  # the top kernel, then both kernels of every level below it


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "hf-cache"
    point_hub_at(monkeypatch, None, path, offline=True)
    monkeypatch.setenv("KERNELHUB_TRUSTED", TRUSTED)
    yield path
    forget_loaded()


def count_reads(monkeypatch, module) -> collections.Counter:
    """Count variant reads through `module.read_variant`; a second read of one variant fails at once."""
    reads, real = collections.Counter(), module.read_variant

    def read(root, **kwargs):
        reads[str(root)] += 1
        assert reads[str(root)] == 1, f"{root} was read {reads[str(root)]} times"
        return real(root, **kwargs)

    monkeypatch.setattr(module, "read_variant", read)
    return reads


def test_a_diamond_is_read_once_per_kernel_when_binding(model, cache, tmp_path, monkeypatch):
    top = diamond(cache, tmp_path / "src", LEVELS)
    reads = count_reads(monkeypatch, loader)
    start = time.monotonic()
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": top})
    seconds = time.monotonic() - start
    assert len(reads) == REACHED and set(reads.values()) == {1}
    assert seconds < 5, f"binding a {LEVELS}-level diamond took {seconds:.1f} s"
    assert any(e.source.startswith(f"hub {TRUSTED}/d0-a@") for e in plan.entries)
    loaded = load_kernel(parse_kernel_ref(top, "test"), torch.device("cpu"))  # warm: no read
    assert len(reads) == REACHED and f"{REACHED} kernels read and verified in" in loaded.note
    assert len(list(loaded.closure.walk())) == REACHED


def test_a_diamond_is_read_once_per_kernel_when_locking(cache, tmp_path, monkeypatch):
    top = diamond(cache, tmp_path / "src", LEVELS)
    reads = count_reads(monkeypatch, locking)
    start = time.monotonic()
    lock = lock_kernels([top], path=tmp_path / "kernelhub.lock")
    seconds = time.monotonic() - start
    assert len(reads) == REACHED and set(reads.values()) == {1}
    assert seconds < 5, f"locking a {LEVELS}-level diamond took {seconds:.1f} s"
    assert len(lock.entries) == REACHED


def test_a_locked_diamond_binds_with_one_read_per_kernel(model, cache, tmp_path, monkeypatch):
    top = diamond(cache, tmp_path / "src", LEVELS)
    lock_path = tmp_path / "kernelhub.lock"
    lock_kernels([top], path=lock_path).write(lock_path)
    reads = count_reads(monkeypatch, loader)
    kernelhub.bind(model, "sdpa", kernels={"RMSNorm": top}, lock=KernelLock.read(lock_path))
    assert len(reads) == REACHED


def test_a_chain_past_the_depth_limit_is_refused_naming_it(model, cache, tmp_path, marker):
    top = dependency_chain(cache, tmp_path / "src", MAX_DEPTH + 8)
    message = refused(model, kernelhub.BindError, [f"{TRUSTED}/chain-0@v1 -> {TRUSTED}/chain-1@v1",
                                                   f"{TRUSTED}/chain-{MAX_DEPTH}@v1", f"deeper than {MAX_DEPTH}"],
                      marker, kernels={"RMSNorm": top})
    assert "more)" in message  # the middle of the chain is elided, its ends are named
    with pytest.raises(HubKernelError, match=f"chain-{MAX_DEPTH}@v1: kernel-depends nests deeper than {MAX_DEPTH}"):
        lock_kernels([top])


def test_a_chain_at_the_depth_limit_binds(model, cache, tmp_path):
    top = dependency_chain(cache, tmp_path / "src", MAX_DEPTH)
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": top})
    assert any(e.source.startswith(f"hub {TRUSTED}/chain-0@") for e in plan.entries)
    assert len(lock_kernels([top]).entries) == MAX_DEPTH
