"""Snapshots of what a bind may change, read through public API only: a refused request
must leave the model and the registry exactly as they were."""

import pytest
import torch

import kernelhub


def snapshot(model):
    sites = [(p, m.binding) for p, m in model.named_modules() if isinstance(m, kernelhub.AttentionSite)]
    layers = [(p, getattr(m.forward, "__func__", None)) for p, m in model.named_modules()
              if hasattr(type(m), "kernel_layer_name")]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    binding = model.binding
    return binding, model.binding_request, sites, layers, weights, binding.entries if binding else None


def registry_snapshot():
    reg = kernelhub.get_registry()
    backends = [(r.backend, r.source) for r in reg.backends()]
    aliases = {alias: r.backend.name for r in reg.backends() for alias in r.backend.aliases}
    layers = {layer: dict(impls) for layer, impls in reg.layer_kernels.items()}
    return backends, aliases, layers


def assert_unchanged(model, before):
    plan, request, sites, layers, weights, entries = snapshot(model)
    assert plan is before[0] and request == before[1] and sites == before[2] and layers == before[3]
    assert entries == before[5]
    assert all(torch.equal(weights[k], before[4][k]) for k in weights)


def refused(model, error, phrases, *, attn="eager", marker=None, **kwargs) -> str:
    """`bind(model, attn, **kwargs)` fails with `error` naming every phrase, and the model, the
    registry and (when given) the file system (no `marker`) are as they were."""
    before, registry_before = snapshot(model), registry_snapshot()
    with pytest.raises(error) as info:
        kernelhub.bind(model, attn, **kwargs)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    assert marker is None or not marker.exists(), "the malicious kernel ran"
    assert_unchanged(model, before)
    assert registry_snapshot() == registry_before
    return message
