"""Binding: request forms, plans, unbind, scoped registries across threads, no look-ups in forward."""

import dataclasses
import json
import subprocess
import sys
import threading

import pytest
import torch

import kernelhub
from kernelhub.declare.eager import eager_attention
from kernelhub.testing.samples import TINY_LLAMA, write_random_checkpoint
from kernelhub.registry import plugins
from threads import run_in_threads


@pytest.fixture(scope="module")
def mistral_checkpoint(tmp_path_factory):
    """Alternating full and sliding layers, so per-layer-type requests have something to choose."""
    path = tmp_path_factory.mktemp("alt")
    write_random_checkpoint(path, {**TINY_LLAMA, "model_type": "mistral", "sliding_window": 3,
                                   "layer_types": ["full_attention", "sliding_attention"] * 2})
    return path


IDS = torch.tensor([[5, 9, 2, 7, 1, 8, 3]])


@pytest.mark.parametrize("spelling, expected", [("flex_attention", "flex"), ("scaled_dot_product", "sdpa"),
                                                (" sdpa ", "sdpa"), ("eager", "eager")])
def test_transformers_spellings_and_aliases(mistral_checkpoint, spelling, expected):
    assert kernelhub.explain(mistral_checkpoint, attn_implementation=spelling).chosen() == {expected}


def test_dict_by_layer_type_and_path_glob(mistral_checkpoint):
    plan = kernelhub.explain(mistral_checkpoint, attn_implementation={
        "model.layers.3.self_attn": "eager", "sliding_attention": "flex", "*": "sdpa"})
    chosen = {e.path: e.chosen for e in plan if e.kind == "attention"}
    assert chosen == {"model.layers.0.self_attn.attn": "sdpa", "model.layers.1.self_attn.attn": "flex",
                      "model.layers.2.self_attn.attn": "sdpa", "model.layers.3.self_attn.attn": "eager"}


def test_mixed_binding_matches_eager(mistral_checkpoint):
    eager = kernelhub.from_pretrained(mistral_checkpoint, attn_implementation="eager")
    mixed = kernelhub.from_pretrained(mistral_checkpoint, attn_implementation={"sliding_attention": "flex",
                                                                               "*": "sdpa"})
    with torch.no_grad():
        torch.testing.assert_close(mixed(IDS).logits, eager(IDS).logits, atol=1e-5, rtol=1e-5)


def test_preference_list_records_rejections(mistral_checkpoint):
    plan = kernelhub.explain(mistral_checkpoint, attn_implementation=["flex", "sdpa"], mode="training")
    entry = plan["model.layers.0.self_attn.attn"]
    assert entry.chosen == "sdpa"
    assert entry.rejected == (("flex", ("forward-only on cpu (backward on cuda), no backward for training",)),)
    row = plan.to_dict()[0]
    assert row == {"path": "model.layers.0.self_attn.attn", "kind": "attention", "chosen": "sdpa",
                   "source": "builtin", "request": "['flex', 'sdpa']", "note": "",
                   "rejected": [{"name": "flex",
                                 "reasons": ["forward-only on cpu (backward on cuda), no backward for training"]}]}


def test_plan_is_immutable_and_prints_a_table(mistral_checkpoint):
    model = kernelhub.from_pretrained(mistral_checkpoint, attn_implementation="sdpa")
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.binding.entries[0].chosen = "eager"
    table = str(model.binding)
    assert "model.layers.{0..3}.self_attn.attn" in table and "attention  sdpa" in table
    assert "model.norm" in table and "reference" in table


def test_unbind_returns_to_eager_reference(mistral_checkpoint):
    model = kernelhub.from_pretrained(mistral_checkpoint, attn_implementation="flex")
    eager = kernelhub.from_pretrained(mistral_checkpoint, attn_implementation="eager")
    kernelhub.unbind(model)
    assert model.binding is None
    assert {m.implementation for m in model.modules() if isinstance(m, kernelhub.AttentionSite)} == {"eager"}
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, eager(IDS).logits, atol=0, rtol=0)


def test_forward_does_no_registry_lookup(mistral_checkpoint, monkeypatch, swap_kernel):
    calls = []

    def mine(module, q, k, v, mask, *, scaling, **kw):
        calls.append(1)
        return eager_attention(module, q, k, v, mask, scaling=scaling, **kw)

    swap_kernel("sdpa", mine)
    model = kernelhub.from_pretrained(mistral_checkpoint, attn_implementation="sdpa")

    def no_lookups(*a, **k):
        raise AssertionError("registry consulted during forward")

    monkeypatch.setattr(plugins, "get_registry", no_lookups)
    monkeypatch.setattr(plugins.Registry, "get", no_lookups)
    with torch.no_grad():
        model(IDS)  # no registry may be consulted, yet the bound callable runs
    assert len(calls) == 4


def test_use_kernels_swaps_layers_and_restores(mistral_checkpoint):
    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    model = kernelhub.from_pretrained(mistral_checkpoint, attn_implementation="sdpa")
    plan = model.binding
    with torch.no_grad():
        before = model(IDS).logits
        with kernelhub.use_kernels({"model.norm": Zero}, model, verify=False):
            assert model.binding["model.norm"].chosen == "Zero"
            assert model(IDS).logits.abs().max() == 0
        torch.testing.assert_close(model(IDS).logits, before, atol=0, rtol=0)
    assert model.binding is plan


def test_scoped_registries_are_isolated_across_threads():
    registered = threading.Barrier(8)

    def worker(i):
        with kernelhub.scoped_registry():
            kernelhub.register_backend(kernelhub.AttentionBackend(f"thread{i}", eager_attention, mask_format="bool"))
            registered.wait(timeout=10)  # every thread has registered before any looks
            names = {b.name for b in kernelhub.backends()}
            assert f"thread{i}" in names and not any(f"thread{j}" in names for j in range(8) if j != i)

    run_in_threads(worker)
    assert not any(b.name.startswith("thread") for b in kernelhub.backends())


def test_concurrent_registration_into_one_registry_loses_nothing():
    registry = kernelhub.get_registry()

    def worker(i):
        for j in range(20):
            registry.register_backend(kernelhub.AttentionBackend(f"b{i}_{j}", eager_attention, mask_format="bool"))

    run_in_threads(worker)
    assert sum(n.startswith("b") for n in registry.backend_names()) == 160


def test_cli_explain_prints_plan_without_loading_weights(mistral_checkpoint, tmp_path):
    # A checkpoint directory with only config.json: explain must not need the weights.
    (tmp_path / "config.json").write_text((mistral_checkpoint / "config.json").read_text())
    run = [sys.executable, "-m", "kernelhub", "explain", str(tmp_path)]
    out = subprocess.run(run + ["--attn", '{"sliding_attention": "eager", "*": "sdpa"}'],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "model.layers.{0,2}.self_attn.attn" in out.stdout and "model.layers.{1,3}.self_attn.attn" in out.stdout
    rows = json.loads(subprocess.run(run + ["--attn", "flex", "--json"], capture_output=True, text=True).stdout)
    assert {r["chosen"] for r in rows if r["kind"] == "attention"} == {"flex"}
    bad = subprocess.run(run + ["--attn", "flesh"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown attention implementation 'flesh'" in bad.stderr


def test_plugin_added_in_a_scope_does_not_leak(mistral_checkpoint):
    class PreferEager:
        @kernelhub.hookimpl
        def kernelhub_select_backend(self, site, candidates, device, dtype, mode):
            return "eager"

    with kernelhub.scoped_registry() as scoped:
        scoped.add_plugin(PreferEager(), "prefer-eager")
        assert kernelhub.explain(mistral_checkpoint, ["sdpa", "eager"]).chosen() == {"eager"}
    assert kernelhub.explain(mistral_checkpoint, ["sdpa", "eager"]).chosen() == {"sdpa"}


def test_capabilities_can_differ_per_device(mistral_checkpoint):
    """flex has a backward pass on CUDA only: training binds it there and refuses it on CPU."""
    assert kernelhub.explain(mistral_checkpoint, "flex", device="cuda", mode="training").chosen() == {"flex"}
    with pytest.raises(kernelhub.BindError, match="flex: forward-only on cpu"):
        kernelhub.explain(mistral_checkpoint, "flex", device="cpu", mode="training")


def test_backends_and_layer_kernels_share_one_capabilities_record():
    """One type, one field per concept: a layer kernel's `has_backward` is read as `backward`."""
    from kernelhub.registry.layer_contract import layer_capabilities, layer_reasons

    class ForwardOnly(torch.nn.Module):
        has_backward, can_torch_compile, dtypes = False, True, (torch.float32,)

        def forward(self, x):
            return x

    caps = layer_capabilities(ForwardOnly, hub=False)
    assert kernelhub.LayerCapabilities is kernelhub.Capabilities and type(caps) is kernelhub.Capabilities
    assert (caps.backward, caps.compile, caps.devices, caps.features()) == (False, True, None, ["compile"])
    assert layer_reasons(caps, torch.device("cpu"), torch.float64, kernelhub.Mode.TRAINING) == [
        "supports float32, not float64", "has_backward=False, cannot train"]
