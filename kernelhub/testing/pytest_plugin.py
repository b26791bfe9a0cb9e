"""kernelhub's pytest plugin (entry point `pytest11`): swap kernels in tests in one line.

Fixtures:

    kernelhub_registry          an isolated registry for this test (built-ins only)
    swap_kernel(name, impl)     replace an attention backend or a layer kernel for this test
    assert_bound(model, path, impl)   assert what the binding plan chose for one site
    tiny_model                  a small random Llama, bound to eager, loaded anew per test
    hub_kernel_repo(name, layers=[Cls], functions=[fn])   a built Hub-layout kernel repo in tmp_path
    offline_hub_cache(repo_id, repo_dir)   a pre-populated HF cache with HF_HUB_OFFLINE on
    assert_matches_reference(model, inputs, kernels=..., attn_implementation="eager")
                                module by module, a binding gives the eager reference's outputs

Marker:

    @pytest.mark.kernelhub_backends          run once per attention backend usable here,
    def test_x(attn_backend): ...            as parameter `attn_backend`; each backend left
                                             out is reported as a skip with its reasons

    def test_norm(swap_kernel):
        swap_kernel("RMSNorm", MyRMSNorm)        # every bind in this test uses it
        model = kernelhub.from_pretrained(path)  # ... RMSNorm layers run MyRMSNorm.forward
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

MARKER = "kernelhub_backends"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{MARKER}(device='cpu'): run the test once per attention backend that can run on this "
                   "machine, as the parameter `attn_backend`; the others are reported as skips with reasons")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None:
        return
    from kernelhub.registry.capabilities import machine_problems
    from kernelhub.registry.plugins import scoped_registry

    device = marker.kwargs.get("device", "cpu")
    params = []
    with scoped_registry(fresh=True, autoload=None) as registry:
        for entry in registry.backends():
            reasons = machine_problems(entry.backend, device)
            marks = [pytest.mark.skip(reason=f"{entry.backend.name}: {'; '.join(reasons)}")] if reasons else []
            params.append(pytest.param(entry.backend.name, id=entry.backend.name, marks=marks))
    metafunc.parametrize("attn_backend", params)


@pytest.fixture
def kernelhub_registry():
    """A fresh registry (built-ins and, unless disabled, installed plugins) for this test only."""
    from kernelhub.registry.plugins import scoped_registry

    with scoped_registry(fresh=True) as registry:
        yield registry


@pytest.fixture
def swap_kernel(kernelhub_registry):
    """`swap_kernel(name, impl)`: replace a backend or a layer kernel until the test ends.

    `name` is an attention backend ("sdpa") or a declared layer ("RMSNorm"). For a backend,
    `impl` is an `AttentionBackend` or a function with the backend signature (it inherits
    the replaced backend's mask format and capabilities, and always receives a mask). For a
    layer, `impl` is a class with `forward(self, x)` or a local kernel directory in the Hub layout
    (a path, or "./dir:Symbol"; built, locked and verified at bind like any local kernel); every
    `bind` in the test uses it unless `kernels=` says otherwise, without a conformance probe (a test
    swaps in what it means to test). Models bound before the swap keep their binding.
    """

    def swap(name: str, impl):
        from kernelhub.declare.layer import declared_layer_names
        from kernelhub.registry.capabilities import AttentionBackend
        from kernelhub.declare.errors import KernelhubError, suggestion

        names = kernelhub_registry.names()
        if name in names:
            old = kernelhub_registry.get(name).backend
            # A bare function never opted in to receiving mask=None, whatever the old backend did.
            new = impl if isinstance(impl, AttentionBackend) else \
                dataclasses.replace(old, fn=impl, accepts_is_causal=False)
            if not callable(new.fn):
                raise KernelhubError(f"swap_kernel({name!r}, ...): {impl!r} is not an attention function or "
                                     "AttentionBackend")
            kernelhub_registry.register_backend(dataclasses.replace(new, name=old.name, aliases=old.aliases),
                                                replace=True, source="swap_kernel")
            return
        layers = declared_layer_names()
        if name not in layers:
            raise KernelhubError(f"swap_kernel: {name!r} is neither a registered attention backend nor a declared "
                                 f"layer.{suggestion(name, [*names, *layers])} Backends: {', '.join(names)}; "
                                 f"layers: {', '.join(sorted(layers))}")
        if isinstance(impl, (str, os.PathLike)):
            impl = _local_kernel(name, impl)
        is_module = isinstance(impl, type) and issubclass(impl, torch.nn.Module)
        if isinstance(impl, str):
            pass  # a local kernel directory, loaded by the bind
        elif not is_module or impl.forward is torch.nn.Module.forward:
            raise KernelhubError(f"swap_kernel({name!r}, ...): {impl!r} breaks the layer contract: expected an "
                                 "nn.Module subclass with its own forward(self, ...) (checked against the layer "
                                 "at bind)")
        # a test swaps in what it means to test, wrong numbers included: no conformance probe
        kernelhub_registry.set_layer_default(name, impl, source="swap_kernel", verify=False)

    return swap


def _local_kernel(layer: str, value) -> str:
    """A local kernel directory as the absolute ref a bind loads ("/abs/dir:Symbol")."""
    from kernelhub.declare.errors import KernelhubError

    text = os.fspath(value)
    directory, _, symbol = text.partition(":") if not os.path.isdir(text) else (text, "", "")
    if not os.path.isdir(directory):
        raise KernelhubError(f"swap_kernel({layer!r}, {text!r}): no such kernel directory; pass a folder in the Hub "
                             "kernel layout (build.toml, torch-ext/ or build/), as a path or './dir:Symbol'")
    return f"{os.path.abspath(directory)}:{symbol or layer}"


@pytest.fixture
def assert_bound():
    """`assert_bound(model, path, impl)`: the plan chose `impl` (a name or class) at `path`; a path not in
    the plan fails naming the closest ones."""

    def check(model: torch.nn.Module, path: str, impl):
        from kernelhub.declare.errors import closest_first

        plan = getattr(model, "binding", None)
        assert plan is not None, "model is not bound (model.binding is None)"
        paths = [e.path for e in plan.entries]
        if path not in paths:
            raise AssertionError(f"{path!r} is not a bound site or layer of {type(model).__name__}; closest: "
                                 f"{', '.join(closest_first(path, paths)[:3])}")
        entry = plan[path]
        want = impl if isinstance(impl, str) else getattr(impl, "__name__", repr(impl))
        assert entry.chosen == want, f"{path} is bound to {entry.chosen!r}, not {want!r}\n{plan}"

    return check


@pytest.fixture(scope="session")
def _tiny_checkpoint_dir(tmp_path_factory):
    from kernelhub.testing.samples import write_random_checkpoint

    path = tmp_path_factory.mktemp("kernelhub-tiny-model")
    write_random_checkpoint(path)
    return path


@pytest.fixture
def tiny_model(_tiny_checkpoint_dir):
    """A small random Llama (4 layers, hidden 64), loaded anew for each test and bound to eager attention:
    `assert_bound(tiny_model, "model.norm", "reference")`."""
    import kernelhub

    return kernelhub.from_pretrained(_tiny_checkpoint_dir, attn_implementation="eager")


@pytest.fixture
def hub_kernel_repo(tmp_path):
    """`hub_kernel_repo(name, layers=[Cls], functions=[fn], ...)`: the Path of a built kernel repo.

    Classes and functions are written out by source (they may use `torch` and `F` only), with
    build.toml, a card, a test and a benchmark, and built, so the repo can be bound by path,
    checked, published or cached. Keyword arguments are those of
    `kernelhub.testing.write_kernel_repo` (version, backends, kernelhub_json, kernels_minver).
    """
    from kernelhub.testing import write_kernel_repo

    def make(name: str = "test-kernel", **kwargs):
        return write_kernel_repo(tmp_path / "kernel-repos" / name, name, **kwargs)

    return make


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """`offline_hub_cache(repo_id, repo_dir, branches=("main", "v1"))` -> the commit it is cached at.

    Points huggingface_hub at an empty cache in tmp_path, turns on offline mode (no request
    can be made), and lays each given built repo out as a download would have; the repo is
    also trusted for this test. Refs like `repo_id@v1` then bind from the cache alone.
    """
    from kernelhub.registry.hub.loader import forget_loaded
    from kernelhub.testing import point_hub_at, populate_hub_cache

    cache, trusted = tmp_path / "offline-hf-cache", []
    point_hub_at(monkeypatch, None, cache, offline=True)

    def add(repo_id: str, repo_dir, branches=("main", "v1")) -> str:
        trusted.append(repo_id)
        monkeypatch.setenv("KERNELHUB_TRUSTED", ",".join(trusted))
        return populate_hub_cache(cache, repo_id, repo_dir, branches=branches)

    yield add
    forget_loaded()


@pytest.fixture
def assert_matches_reference():
    """`assert_matches_reference(model, inputs, kernels=None, attn_implementation="eager", atol=None, rtol=None)`.

    Traces `model` on `inputs` unbound (every site and layer on its eager reference), then
    bound with `attn_implementation` and `kernels`, and fails naming the first module
    (in forward order) whose outputs differ beyond tolerance, with its numbers. Tolerances
    default per dtype (see `kernelhub.debug.compare`). The model's own binding is put back
    afterwards (rebound from its request), or it is left unbound if it had none. Returns
    the comparison.

        def test_my_norm(tiny_model, assert_matches_reference):
            assert_matches_reference(tiny_model, torch.tensor([[1, 2, 3]]), kernels={"RMSNorm": MyRMSNorm})
    """
    from kernelhub.debug import compare, format_comparison, trace
    from kernelhub.registry.bind import bind, unbind

    def check(model, inputs, *, kernels=None, attn_implementation="eager", atol=None, rtol=None) -> dict:
        __tracebackhide__ = True
        plan = getattr(model, "binding", None)
        try:
            unbind(model)
            reference = trace(model, inputs, keep_tensors=True)
            bind(model, attn_implementation, kernels, verify=False)  # it exists to find a wrong kernel
            bound = trace(model, inputs, keep_tensors=True)
        finally:
            unbind(model)
            if plan is not None:
                request = plan.request
                bind(model, request.attn_implementation, request.kernels, device=plan.device,
                     dtype=getattr(torch, plan.dtype), mode=request.mode, lock=request.lock)
        result = compare(reference, bound, atol=atol, rtol=rtol)
        first = result["first_divergent"]
        if first is not None:
            where = (first["module_path"] or "(model)") + (f" [{first['output']}]" if first["output"] else "")
            raise AssertionError(f"{where} ({first['type']}) diverges from the eager reference: max abs "
                                 f"{float(first['max_abs']):.3g}, max rel {float(first['max_rel']):.3g}; "
                                 f"{first['note']}\n\n{format_comparison(result, names=('reference', 'binding'))}")
        return result

    return check
