"""Small public functions over the current registry (re-exported from `kernelhub`)."""

from __future__ import annotations

import contextlib

from kernelhub.backends.layer import layer_name
from kernelhub.backends.site import AttentionSite
from kernelhub.registry.bind import bind
from kernelhub.registry.capabilities import AttentionBackend
from kernelhub.registry.manager import Registered, get_registry


def register_backend(backend: AttentionBackend, *, replace: bool = False) -> None:
    """Register an attention backend in the current registry (scoped or global).

    >>> import kernelhub
    >>> from kernelhub.backends.eager import eager_attention
    >>> with kernelhub.scoped_registry():
    ...     kernelhub.register_backend(kernelhub.AttentionBackend("mine", eager_attention, mask_format="bool"))
    ...     "mine" in [b.name for b in kernelhub.backends()]
    True
    """
    get_registry().register_backend(backend, replace=replace)


def unregister_backend(name: str) -> AttentionBackend:
    """Remove a backend (by name or alias) from the current registry and return it."""
    return get_registry().unregister_backend(name)


def backends() -> list[AttentionBackend]:
    """The registered backends, in registration order."""
    return [r.backend for r in get_registry().backends()]


def backend_sources() -> list[Registered]:
    """The registered backends with the plugin each came from."""
    return get_registry().backends()


@contextlib.contextmanager
def use_kernels(kernels: dict, *models):
    """Swap layer kernels on `models` inside the block, restoring their previous binding after.

    >>> import torch, kernelhub
    >>> from kernelhub.models.llama import LlamaForCausalLM
    >>> model = LlamaForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 16,
    ...                           "num_hidden_layers": 1, "num_attention_heads": 2})
    >>> class Zero(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.zeros_like(x)
    >>> with kernelhub.use_kernels({"RMSNorm": Zero}, model):
    ...     bool(model(torch.tensor([[1, 2]])).logits.abs().sum() == 0)
    True
    """
    saved = [_snapshot(m) for m in models]
    for model in models:
        request = getattr(model, "binding_request", None) or {}
        bind(model, request.get("attn_implementation"), {**(request.get("kernels") or {}), **kernels})
    try:
        yield
    finally:
        for snapshot in saved:
            _restore(snapshot)


def _snapshot(model):
    """Everything binding changes on `model`, so it can be put back exactly."""
    sites = [(m, m.implementation_state()) for m in model.modules() if isinstance(m, AttentionSite)]
    layers = [(m, m.__dict__.get("forward")) for m in model.modules() if layer_name(m)]
    return model, getattr(model, "binding", None), getattr(model, "binding_request", None), sites, layers


def _restore(snapshot):
    model, plan, request, sites, layers = snapshot
    for site, state in sites:
        site.set_implementation(*state)
    for module, forward in layers:
        module.__dict__.pop("forward", None)
        if forward is not None:
            module.forward = forward
    model.binding, model.binding_request = plan, request
