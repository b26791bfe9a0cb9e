"""`bind` and `unbind`: walk a model once, choose an implementation per site, apply atomically.

Every decision is computed before anything is changed, so a request that fails leaves
the model exactly as it was (including a previous binding).

>>> import kernelhub, torch
>>> from kernelhub.models.llama import LlamaForCausalLM
>>> model = LlamaForCausalLM({"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
...                           "num_hidden_layers": 2, "num_attention_heads": 2})
>>> plan = kernelhub.bind(model, attn_implementation="sdpa")
>>> sorted(plan.chosen())
['sdpa']
"""

from __future__ import annotations

import os

import torch

from kernelhub.backends.layer import layer_name, reset_layer_forward, set_layer_forward
from kernelhub.backends.site import AttentionSite
from kernelhub.registry.capabilities import MODES, unsupported
from kernelhub.registry.errors import BindError, KernelhubError
from kernelhub.registry.hub.attention import hub_backend
from kernelhub.registry.hub.fetch import hub_budget
from kernelhub.registry.hub.ref import looks_like_kernel_ref
from kernelhub.registry.layer_kernels import LayerChoice, choose_layer_kernel, parse_kernels
from kernelhub.registry.hub.lockfile import KernelLock
from kernelhub.registry.manager import get_registry
from kernelhub.registry.plan import BindingPlan, PlanEntry
from kernelhub.registry.request import parse_attn_implementation


def _device_and_dtype(model, device, dtype):
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    if device.type == "meta":
        device = torch.device("cpu")
    return device, dtype or (param.dtype if param is not None else torch.float32)


def choose_backend(site, path, request, registry, device, dtype, mode, lookup=None):
    """A PlanEntry for one attention site, or BindError listing every reason."""
    fitting, rejected = [], []
    for name in request.names:
        entry = (lookup or registry.get)(name)
        reasons = unsupported(entry.backend, site, device, dtype, mode)
        if request.paged and not entry.backend.capabilities.paged:
            reasons.append("does not support a paged KV cache (asked for 'paged|...')")
        if reasons:
            rejected.append((entry.backend.name, tuple(reasons)))
        else:
            fitting.append(entry)
    if not fitting:
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected)
        what = f"{request.names[0]!r} cannot" if request.explicit else f"none of {list(request.names)} can"
        raise BindError(f"{what} serve attention site {path!r} on {device.type}/{str(dtype).removeprefix('torch.')} "
                        f"in {mode} mode: {detail}. Valid backends: {', '.join(registry.backend_names())}")
    picked = registry.pm.hook.kernelhub_select_backend(
        site=site, candidates=[e.backend.name for e in fitting], device=device, dtype=dtype, mode=mode)
    chosen = next((e for e in fitting if e.backend.name == picked), fitting[0])
    resolution = chosen.backend.resolution(device, dtype)
    notes = ["selected by policy hook" if picked and chosen is not fitting[0] else "", resolution.note]
    note = "; ".join(n for n in notes if n)
    return PlanEntry(path, "attention", chosen.backend.name, chosen.source, request.origin, tuple(rejected), note), \
        (chosen.backend, resolution)


def _lookup_for(registry, device, lock):
    """name -> Registered, for registered names and Hub attention references alike (memoised)."""
    memo = {}

    def lookup(name):
        if name not in memo:
            memo[name] = hub_backend(name, device, lock) if looks_like_kernel_ref(name) else registry.get(name)
        return memo[name]

    return lookup


def _read_lock(lock):
    if lock is None:
        return KernelLock.from_env()
    return lock if isinstance(lock, KernelLock) else KernelLock.read(lock)


def bind(model: torch.nn.Module, attn_implementation=None, kernels=None, *, device=None, dtype=None,
         mode: str = "inference", lock=None) -> BindingPlan:
    """Bind every attention site and declared layer of `model`; returns the `BindingPlan`.

    Also sets `model.binding` (the plan) and `model.binding_request` (what was asked,
    saved by `save_pretrained` so a reload binds the same way). `lock` (a path or
    `KernelLock`; default $KERNELHUB_LOCK) pins and verifies every Hub kernel.
    """
    if mode not in MODES:
        raise KernelhubError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    with hub_budget():  # one Hub deadline for the whole bind, however many refs it names
        return _bind(model, attn_implementation, kernels, device, dtype, mode, lock)


def _bind(model, attn_implementation, kernels, device, dtype, mode, lock) -> BindingPlan:
    registry = get_registry()
    device, dtype = _device_and_dtype(model, device, dtype)
    lock = _read_lock(lock)
    lookup = _lookup_for(registry, device, lock)
    sites = {path: m for path, m in model.named_modules() if isinstance(m, AttentionSite)}
    layers = {path: m for path, m in model.named_modules() if layer_name(m)}
    spec = parse_attn_implementation(attn_implementation, {s.layer_type for s in sites.values()})
    spec.check_keys({p: s.layer_type for p, s in sites.items()})
    for request in spec.requests():
        for name in request.names:
            lookup(name)  # unknown names fail even where no site (or an earlier choice) uses them
    layer_spec = parse_kernels(kernels, layers, registry, device, lock)

    entries, attention_actions, layer_actions = [], [], []
    for path, site in sites.items():
        request = spec.request_for(path, site.layer_type)
        entry, backend = choose_backend(site, path, request, registry, device, dtype, mode, lookup)
        entries.append(entry)
        attention_actions.append((site, backend))
    for path, module in layers.items():
        choice: LayerChoice = choose_layer_kernel(path, module, layer_spec, registry, device, dtype, mode)
        entries.append(choice.entry)
        layer_actions.append((module, choice.forward))

    # Everything is decided: now apply, which cannot fail half-way.
    for site, (backend, resolution) in attention_actions:
        site.set_implementation(backend.name, resolution.fn, backend.mask_format, backend.accepts_is_causal,
                                backend.capabilities.returns_weights, resolution.paged_fn)
    for module, forward in layer_actions:
        reset_layer_forward(module)  # also drops what a previous kernel cached on the module
        if forward is not None:
            set_layer_forward(module, forward)
    plan = BindingPlan(tuple(entries), device=str(device), dtype=str(dtype).removeprefix("torch."), mode=mode)
    model.binding = plan
    model.binding_request = _serialisable_request(attn_implementation, kernels)
    return plan


def unbind(model: torch.nn.Module) -> None:
    """Return every site and layer of `model` to its eager reference."""
    for module in model.modules():
        if isinstance(module, AttentionSite):
            module.unbind()
        elif layer_name(module):
            reset_layer_forward(module)
    model.binding = None
    model.binding_request = None


def _serialisable_request(attn_implementation, kernels):
    """The part of a request that can be written to config.json (names, not objects)."""
    request = {}
    if attn_implementation is not None:
        request["attn_implementation"] = attn_implementation
    if kernels:
        named = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in kernels.items()
                 if isinstance(v, (str, os.PathLike)) or (isinstance(v, list) and all(isinstance(i, str) for i in v))}
        if named:
            request["kernels"] = named
    return request or None
