"""`use_kernels`: swap layer kernels on models for the length of a block, then put everything back.

The swap is a rebind that keeps the rest of each model's binding (attention request, mode,
dtype, device, lock, kernels it already had); on exit the previous plan, site records and
layer forwards come back exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kernelhub.declare.binding import changing, own_forward, publish, published, set_own_forward
from kernelhub.declare.layer import layer_name
from kernelhub.declare.site import AttentionSite
from kernelhub.registry.bind import apply, decide, rebind
from kernelhub.registry.request import Kernels


@contextlib.contextmanager
def use_kernels(kernels: Kernels, *models: torch.nn.Module, verify: bool = True) -> Iterator[None]:
    """Swap layer kernels on `models` inside the block, restoring their previous binding after.

    The rest of each model's binding is kept: its attention request, mode, dtype, device,
    lock and every kernel it already had (in-process ones included); on exit the previous
    plan and forwards come back exactly. The swapped kernels pass conformance first, unless
    `verify=False` (a test that swaps in a wrong kernel on purpose).

    >>> import torch, kernelhub
    >>> from kernelhub.models.llama import LlamaForCausalLM
    >>> model = LlamaForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 16,
    ...                           "num_hidden_layers": 1, "num_attention_heads": 2})
    >>> class Zero(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.zeros_like(x)
    >>> with kernelhub.use_kernels({"RMSNorm": Zero}, model, verify=False):
    ...     bool(model(torch.tensor([[1, 2]])).logits.abs().sum() == 0)
    True
    """
    saved = [_snapshot(m) for m in models]
    # every model is checked before any is changed
    decided = [rebind(m, kernels=kernels, verify=verify) if getattr(m, "binding", None) is not None
               else decide(m, None, kernels, verify=verify) for m in models]
    for model, decisions in zip(models, decided):
        apply(model, decisions)
    try:
        yield
    finally:
        for snapshot in saved:
            _restore(snapshot)


def _snapshot(model: torch.nn.Module) -> tuple:
    """Everything binding changes on `model`, so it can be put back exactly."""
    sites = [(m, m._binding) for m in model.modules() if isinstance(m, AttentionSite)]
    layers = [(m, own_forward(m), m.__dict__.get("forward")) for m in model.modules() if layer_name(m)]
    return (model, getattr(model, "binding", None), getattr(model, "binding_request", None), published(model),
            sites, layers)


def _restore(snapshot: tuple) -> None:
    model = snapshot[0]
    with changing(model):
        _put_back(*snapshot)


def _put_back(model, plan, request, record, sites, layers):
    for site, own in sites:
        site.set_binding(own)
    for module, own, running in layers:
        set_own_forward(module, own)
        module.__dict__.pop("forward", None)
        if running is not None:
            module.forward = running
    if record is not None:
        publish(model, record)
    model.binding, model.binding_request = plan, request
