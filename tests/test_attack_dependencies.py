"""Attacks through `kernel-depends`: every kernel of the closure passes kernelhub's trust and
lock, whoever the Hub says published it; nothing of a refused closure runs."""

import json
import socket

import pytest
import torch

import kernelhub
from kernelhub.registry.hub.fetch import HubKernelError
from kernelhub.registry.hub.loader import forget_loaded
from kernelhub.registry.hub.locking import lock_kernels
from kernelhub.registry.hub.lockfile import KernelLock, LockError
from kernelhub.registry.hub.trust import UntrustedKernelError
from kernelhub.testing import point_hub_at
from tests.attack_kernels import TRUSTED, cached_variant, kernel, payload, refused, to_cache

DEP = {"repo-id": "stranger/evil", "version": 1}


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An offline HF cache, with the test org trusted."""
    path = tmp_path / "hf-cache"
    point_hub_at(monkeypatch, None, path, offline=True)
    monkeypatch.setenv("KERNELHUB_TRUSTED", f"{TRUSTED},friend")
    yield path
    forget_loaded()


def no_network(monkeypatch):
    def refuse(*args):
        raise AssertionError(f"unexpected network connection to {args[1:]}")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_untrusted_dependency_is_refused_offline(model, cache, tmp_path, marker):
    to_cache(cache, "stranger/evil", kernel(tmp_path, "evil", init=payload(marker)))
    to_cache(cache, f"{TRUSTED}/good", kernel(tmp_path, "good", depends=[DEP]))
    message = refused(model, UntrustedKernelError, [f"{TRUSTED}/good@v1 -> stranger/evil@v1: not trusted",
                                                    "KERNELHUB_TRUSTED=stranger", "config.toml"],
                      marker, kernels={"RMSNorm": f"{TRUSTED}/good@v1"})
    assert "nor of the kernels that depend on it" in message


def test_untrusted_dependency_of_a_cached_pinned_kernel_is_refused_before_any_request(
        model, cache, tmp_path, marker, monkeypatch):
    to_cache(cache, "stranger/evil", kernel(tmp_path, "evil", init=payload(marker)))
    commit = to_cache(cache, f"{TRUSTED}/good", kernel(tmp_path, "good", depends=[DEP]))
    point_hub_at(monkeypatch, "http://127.0.0.1:9", cache, offline=False)
    no_network(monkeypatch)
    refused(model, UntrustedKernelError, ["-> stranger/evil@v1: not trusted"], marker,
            kernels={"RMSNorm": f"{TRUSTED}/good@{commit}"})


def test_untrusted_dependency_of_a_local_directory_is_refused(model, cache, tmp_path, marker):
    to_cache(cache, "stranger/evil", kernel(tmp_path, "evil", init=payload(marker)))
    local = kernel(tmp_path, "good", depends=[DEP])
    refused(model, UntrustedKernelError, [f"{local} -> stranger/evil@v1: not trusted"], marker,
            kernels={"RMSNorm": str(local)})


def test_transitive_untrusted_dependency_names_the_whole_chain(model, cache, tmp_path, marker):
    to_cache(cache, "stranger/evil", kernel(tmp_path, "evil", init=payload(marker)))
    to_cache(cache, "friend/middle", kernel(tmp_path, "middle", init=payload(marker), depends=[DEP]))
    to_cache(cache, f"{TRUSTED}/good", kernel(tmp_path, "good", depends=[{"repo-id": "friend/middle", "version": 1}]))
    refused(model, UntrustedKernelError,
            [f"{TRUSTED}/good@v1 -> friend/middle@v1 -> stranger/evil@v1: not trusted"], marker,
            kernels={"RMSNorm": f"{TRUSTED}/good@v1"})


def test_dependency_edited_after_locking_is_refused(model, cache, tmp_path, marker):
    to_cache(cache, "friend/dep", kernel(tmp_path, "dep"))
    to_cache(cache, f"{TRUSTED}/good", kernel(tmp_path, "good", depends=[{"repo-id": "friend/dep", "version": 1}]))
    lock_path = tmp_path / "kernelhub.lock"
    lock = lock_kernels([f"{TRUSTED}/good@v1"], path=lock_path)
    assert sorted(lock.entries) == ["friend/dep@v1", f"{TRUSTED}/good@v1"]  # the closure is locked
    lock.write(lock_path)
    init = cached_variant(cache, "friend/dep") / "dep" / "__init__.py"
    init.write_text(init.read_text() + payload(marker))
    refused(model, LockError, ["friend/dep@", "does not match the lock", "changed: dep/__init__.py"], marker,
            kernels={"RMSNorm": f"{TRUSTED}/good@v1"}, lock=lock_path)


def test_dependency_missing_from_the_lock_is_refused(model, cache, tmp_path, marker):
    to_cache(cache, "friend/dep", kernel(tmp_path, "dep", init=payload(marker)))
    to_cache(cache, f"{TRUSTED}/good", kernel(tmp_path, "good", depends=[{"repo-id": "friend/dep", "version": 1}]))
    lock_path = tmp_path / "kernelhub.lock"
    lock_kernels([f"{TRUSTED}/good@v1"], path=lock_path).write(lock_path)
    data = json.loads(lock_path.read_text())
    del data["kernels"]["friend/dep@v1"]
    lock_path.write_text(json.dumps(data))
    refused(model, LockError, ["friend/dep@v1 is not in the lock"], marker,
            kernels={"RMSNorm": f"{TRUSTED}/good@v1"}, lock=lock_path)


def test_publisher_flag_never_decides_trust(model, hub, tmp_path, marker, monkeypatch):
    """Online, with `kernels`' publisher check answering "trusted" for everyone."""
    import kernels.hf_hub
    import kernels.resolver

    monkeypatch.setattr(kernels.hf_hub, "_check_trust_remote_code", lambda *a, **k: None)
    monkeypatch.setattr(kernels.resolver, "_check_trust_remote_code", lambda *a, **k: None)
    hub.publish("stranger/evil", kernel(tmp_path, "evil", init=payload(marker)))
    hub.publish(f"{TRUSTED}/with-dep", kernel(tmp_path, "with-dep", depends=[DEP]))
    refused(model, UntrustedKernelError, [f"{TRUSTED}/with-dep@v1 -> stranger/evil@v1: not trusted"], marker,
            kernels={"RMSNorm": f"{TRUSTED}/with-dep@v1"})
    assert not list((tmp_path / "hf-cache").glob("kernels--stranger--evil")), "the untrusted repo was downloaded"


def test_dependency_cycle_is_a_clear_error(model, cache, tmp_path, marker):
    to_cache(cache, "friend/cycle-b", kernel(tmp_path, "cycle-b", init=payload(marker),
                                             depends=[{"repo-id": f"{TRUSTED}/cycle-a", "version": 1}]))
    to_cache(cache, f"{TRUSTED}/cycle-a", kernel(tmp_path, "cycle-a", init=payload(marker),
                                                 depends=[{"repo-id": "friend/cycle-b", "version": 1}]))
    with pytest.raises(HubKernelError, match="cycle-a@v1 -> friend/cycle-b@v1 -> kernelhub-test/cycle-a@v1: a dep"):
        lock_kernels([f"{TRUSTED}/cycle-a@v1"])
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": [f"{TRUSTED}/cycle-a@v1", "reference"]})
    entry = next(e for e in plan.entries if e.path.endswith("input_layernorm"))
    assert entry.chosen == "reference" and "a dependency cycle" in " ".join(entry.rejected[0][1])
    assert not marker.exists()


def test_trusted_locked_dependencies_load_offline_and_reach_the_kernel(model, cache, tmp_path, monkeypatch):
    dep_init = "import builtins\nbuiltins.__dict__.setdefault('_kernelhub_dep_imports', []).append(__name__)\n"
    to_cache(cache, "friend/dep", kernel(tmp_path, "dep", init=dep_init))
    good_init = "from kernels import get_kernel_dep\nDEP = get_kernel_dep('friend/dep')\n"
    to_cache(cache, f"{TRUSTED}/good", kernel(tmp_path, "good", init=good_init,
                                              depends=[{"repo-id": "friend/dep", "version": 1}]))
    lock_path = tmp_path / "kernelhub.lock"
    lock_kernels([f"{TRUSTED}/good@v1"], path=lock_path).write(lock_path)
    no_network(monkeypatch)
    ids = torch.randint(0, 100, (1, 5))
    reference = model(ids).logits
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": f"{TRUSTED}/good@v1"}, lock=lock_path)
    assert any(e.source.startswith(f"hub {TRUSTED}/good@") for e in plan.entries)
    from kernelhub.registry.hub.loader import load_kernel
    loaded = load_kernel(kernelhub.registry.hub.ref.parse_kernel_ref(f"{TRUSTED}/good@v1", "test"),
                         torch.device("cpu"), KernelLock.read(lock_path))
    assert loaded.module.DEP.__name__ == __import__("builtins")._kernelhub_dep_imports[-1]
    assert [d.label for d in loaded.closure.deps] == ["friend/dep@v1"]
    torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)


def test_a_kernel_imported_before_a_lock_is_not_handed_out_with_other_dependencies(cache, tmp_path):
    """The same kernel bytes with a dependency that moved: under the lock, the locked one runs."""
    import builtins

    from kernelhub.registry.hub.loader import load_kernel
    from kernelhub.registry.hub.ref import parse_kernel_ref

    who = "import builtins\nWHO = {!r}\n"
    to_cache(cache, "friend/dep", kernel(tmp_path / "one", "dep", init=who.format("first")))
    good_init = "from kernels import get_kernel_dep\nDEP = get_kernel_dep('friend/dep')\n"
    to_cache(cache, f"{TRUSTED}/good", kernel(tmp_path, "good", init=good_init,
                                              depends=[{"repo-id": "friend/dep", "version": 1}]))
    ref = parse_kernel_ref(f"{TRUSTED}/good@v1", "test")
    assert load_kernel(ref, torch.device("cpu")).module.DEP.WHO == "first"
    to_cache(cache, "friend/dep", kernel(tmp_path / "two", "dep", init=who.format("second")))  # v1 moves
    lock_path = tmp_path / "kernelhub.lock"
    lock_kernels([f"{TRUSTED}/good@v1"], path=lock_path).write(lock_path)
    locked = load_kernel(ref, torch.device("cpu"), KernelLock.read(lock_path))
    assert locked.module.DEP.WHO == "second"
    commit = KernelLock.read(lock_path).entries["friend/dep@v1"].commit
    assert locked.closure.deps[0].source == f"hub friend/dep@{commit}"
    assert not hasattr(builtins, "_never")
