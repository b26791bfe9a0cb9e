"""`bind` and `unbind`: walk a model once, choose an implementation per site, apply atomically.

Every decision is computed before anything is changed (`decide`), so a request that fails
leaves the model exactly as it was, including a previous binding; `apply` then installs
one immutable record per attention site and one forward per layer. Attention sites and
declared layers go through the same grammar (`request`) and the same chooser (`choose`).

>>> import kernelhub, torch
>>> from kernelhub.models.llama import LlamaForCausalLM
>>> model = LlamaForCausalLM({"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64,
...                           "num_hidden_layers": 2, "num_attention_heads": 2})
>>> plan = kernelhub.bind(model, attn_implementation="sdpa")
>>> sorted(plan.chosen())
['sdpa']
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os

import torch

from kernelhub.declare.errors import BindError, KernelhubError
from kernelhub.declare.layer import layer_name, reset_layer_forward, set_layer_forward
from kernelhub.declare.log import first_time
from kernelhub.declare.site import AttentionSite, SiteBinding
from kernelhub.registry.bind_layers import layer_decisions
from kernelhub.registry.capabilities import on_device, unsupported
from kernelhub.registry.choose import REFUSALS, Option, choose
from kernelhub.registry.forward_only import forward_only
from kernelhub.registry.hub.attention import hub_backend
from kernelhub.registry.hub.fetch import hub_budget
from kernelhub.registry.hub.lockfile import KernelLock
from kernelhub.registry.hub.ref import looks_like_kernel_ref
from kernelhub.registry.modes import Mode, parse_mode
from kernelhub.registry.plan import BindingPlan, BindRequest, _collapse
from kernelhub.registry.plugins import get_registry
from kernelhub.registry.request import KNOWN_LAYER_TYPES, glob_matches, parse_attn_implementation
from kernelhub.registry.watch import watch_moves

logger = logging.getLogger(__name__)


def _device_and_dtype(model, device, dtype):
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    if device.type == "meta":
        device = torch.device("cpu")
    return device, dtype or (param.dtype if param is not None else torch.float32)


def _read_lock(lock):
    if lock is None:
        return KernelLock.from_env()
    return lock if isinstance(lock, KernelLock) else KernelLock.read(lock)


@dataclasses.dataclass(frozen=True)
class Decisions:
    """Everything a bind will do, decided and checked, nothing applied yet."""

    plan: BindingPlan
    sites: tuple      # ((AttentionSite, SiteBinding), ...)
    layers: tuple     # ((module, forward or None), ...)


def _attention_loader(registry, device, lock):
    memo = {}

    def load(name) -> Option:
        if name not in memo:
            if looks_like_kernel_ref(name):
                try:
                    registered = hub_backend(name, device, lock)
                except REFUSALS:
                    raise
                except KernelhubError as e:  # a kernel that failed to load: a reason, like any other
                    memo[name] = Option(name, "hub", problems=(str(e),))
                    return memo[name]
            else:
                registered = registry.get(name)
            memo[name] = Option(registered.backend.name, registered.source, registered)
        return memo[name]

    return load


def _site_binding(backend, resolution, device, mode: Mode) -> SiteBinding:
    fn, paged_fn = resolution.fn, resolution.paged_fn
    if not mode.training and not on_device(backend.capabilities.on(device.type).backward, device.type):
        fn = forward_only(fn, backend.name, device.type)
        paged_fn = forward_only(paged_fn, backend.name, device.type) if paged_fn else None
    return SiteBinding(backend.name, fn, backend.mask_format, backend.accepts_is_causal,
                       backend.capabilities.on(device.type).returns_weights, paged_fn)


def _attention_decisions(model, attn_implementation, registry, device, dtype, mode, lock):
    sites = {path: m for path, m in model.named_modules() if isinstance(m, AttentionSite)}
    if attn_implementation is not None and not sites:
        raise KernelhubError(f"{type(model).__name__} has no kernelhub attention sites, so attn_implementation="
                             f"{attn_implementation!r} has nothing to bind. For a transformers model use the "
                             "kernelhub-transformers bridge (attn_implementation='kernelhub:NAME'); kernels= works "
                             "on any model with @layer-declared modules")
    request = parse_attn_implementation(attn_implementation, {s.layer_type for s in sites.values()})
    for glob, _ in request.by_glob:
        if not any(glob_matches(glob, p) for p in sites):
            example = next(iter(sites), "model.layers.0.self_attn.attn")
            types = sorted({s.layer_type for s in sites.values()} | set(KNOWN_LAYER_TYPES))
            raise BindError(f"attn_implementation key {glob!r} matches no attention site. Keys are layer types "
                            f"({', '.join(types)}), '*', or module-path globs like {example!r}")
    load = _attention_loader(registry, device, lock)
    for _, chain in request.chains():
        for name in chain.values:
            if not looks_like_kernel_ref(name):
                registry.get(name)  # unknown names fail even where no site uses them
    entries, actions = [], []
    for path, site in sites.items():
        key, chain = request.lookup(path, site.layer_type)
        if chain is None:
            keys = ", ".join(repr(k) for k, _ in request.chains())
            raise BindError(f"attn_implementation dict has no entry for attention site {path!r} (layer type "
                            f"{site.layer_type!r}); keys given: {keys}. Add a '*' entry or the key {site.layer_type!r}")

        def reasons(option, site=site, chain=chain):
            why = unsupported(option.payload.backend, site, device, dtype, mode)
            if chain.paged and not option.payload.backend.capabilities.on(device.type).paged:
                why.append("does not support a paged KV cache (asked for 'paged|...')")
            return why

        def pick(fitting, site=site):
            picked = registry.pm.hook.kernelhub_select_backend(
                site=site, candidates=[o.payload.backend.name for o in fitting], device=device, dtype=dtype,
                mode=str(mode))
            return next((o for o in fitting if o.payload.backend.name == picked), fitting[0])

        entry, option = choose("attention", path, key if key != "*" else None, chain, load, reasons,
                               device=device, dtype=dtype, mode=mode, pick=pick,
                               valid=f"Valid backends: {', '.join(registry.backend_names())}")
        backend = option.payload.backend
        resolution = backend.resolution(device, dtype)
        note = "; ".join(n for n in (entry.note, resolution.note) if n)
        entries.append(dataclasses.replace(entry, note=note))
        actions.append((site, _site_binding(backend, resolution, device, mode)))
    return entries, actions


def decide(model, attn_implementation=None, kernels=None, *, device=None, dtype=None, mode="inference",
           lock=None) -> Decisions:
    """Everything `bind` would do to `model`, checked; raises before anything changes."""
    mode = parse_mode(mode)
    registry = get_registry()
    device, dtype = _device_and_dtype(model, device, dtype)
    lock = _read_lock(lock)
    with hub_budget():  # one Hub deadline for the whole bind, however many refs it names
        entries, site_actions = _attention_decisions(model, attn_implementation, registry, device, dtype, mode, lock)
        layer_entries, layer_actions = layer_decisions(model, kernels, registry, device, dtype, mode, lock)
    request = BindRequest(attn_implementation, kernels, mode, lock)
    tp = getattr(model, "tensor_parallel", None)  # the plan records each module's shard on this rank
    all_entries = tuple(entries) + tuple(layer_entries)
    if tp is not None:
        all_entries = tuple(dataclasses.replace(e, sharding=tp.describe(e.path)) for e in all_entries)
    plan = BindingPlan(all_entries, device=str(device),
                       dtype=str(dtype).removeprefix("torch."), mode=mode, request=request,
                       watch=tuple((len(entries) + i, module, forward) for i, (module, forward)
                                   in enumerate(layer_actions)),
                       tensor_parallel=tp.to_dict() if tp is not None else None)
    return Decisions(plan, tuple(site_actions), tuple(layer_actions))


def apply(model, decisions: Decisions) -> BindingPlan:
    """Install what `decide` chose: cannot fail half-way."""
    for site, record in decisions.sites:
        site.set_binding(record)
    for module, forward in decisions.layers:
        reset_layer_forward(module)  # also drops what a previous kernel cached on the module
        if forward is not None:
            set_layer_forward(module, forward)
    model.binding = decisions.plan
    model.binding_request = _serialisable_request(decisions.plan.request)
    watch_moves(model, rebind, apply)
    _log_binding(model, decisions.plan)
    return decisions.plan


def bind(model: torch.nn.Module, attn_implementation=None, kernels=None, *, device=None, dtype=None,
         mode="inference", lock=None) -> BindingPlan:
    """Bind every attention site and declared layer of `model`; returns the `BindingPlan`.

    Also sets `model.binding` (the plan) and `model.binding_request` (what was asked,
    saved by `save_pretrained` so a reload binds the same way). `mode` is a `Mode` (or
    'inference', 'training', 'compile', a `kernels.Mode`); `lock` (a path or `KernelLock`;
    default $KERNELHUB_LOCK) pins and verifies every Hub and local kernel.
    """
    return apply(model, decide(model, attn_implementation, kernels, device=device, dtype=dtype, mode=mode,
                               lock=lock))


def rebind(model, *, device=None, dtype=None, kernels=None) -> Decisions:
    """The decisions that re-create `model`'s binding with one thing changed (device, dtype, or
    extra kernels); mode, lock and in-process kernels are kept."""
    request: BindRequest = model.binding.request
    merged = {**(request.kernels or {}), **kernels} if kernels else request.kernels
    return decide(model, request.attn_implementation, merged, device=device or model.binding.device,
                  dtype=dtype or getattr(torch, model.binding.dtype), mode=request.mode, lock=request.lock)


def unbind(model: torch.nn.Module) -> None:
    """Return every site and layer of `model` to its eager reference."""
    for module in model.modules():
        if isinstance(module, AttentionSite):
            module.unbind()
        elif layer_name(module):
            reset_layer_forward(module)
    model.binding = None
    model.binding_request = None


def _log_binding(model, plan: BindingPlan) -> None:
    """INFO: what runs where, counted; WARNING: each distinct fallback reason, once per process."""
    if logger.isEnabledFor(logging.INFO):
        counts: dict = collections.defaultdict(collections.Counter)  # label -> chosen -> sites, in plan order
        for e in plan.entries:
            label = "attention" if e.kind == "attention" else (layer_name(_submodule(model, e.path)) or "layer")
            counts[label][e.chosen] += 1
        summary = "; ".join(f"{label} " + ", ".join(f"{chosen} x{n}" for chosen, n in chosen.items())
                            for label, chosen in counts.items())
        logger.info("bound %s on %s/%s (%s): %s", type(model).__name__, str(plan.device).split(":")[0],
                    plan.dtype, plan.mode, summary or "nothing to bind")
    # Collapsed paths (model.layers.{0..31}...) and a process-wide memory of (candidate, reason):
    # a 32-layer model, or the same model loaded a hundred times, warns once per reason.
    for e in _collapse(plan.entries):
        for name, reasons in e.rejected:
            new = [r for r in reasons if first_time(("fallback", name, r))]
            if new:
                logger.warning("%s: %s rejected: %s; using %s", e.path, name, "; ".join(new), e.chosen)


def _submodule(model, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _serialisable_request(request: BindRequest):
    """The part of a request that can be written to config.json (names, not objects)."""
    saved = {}
    if request.attn_implementation is not None:
        saved["attn_implementation"] = request.attn_implementation
    if request.kernels:
        named = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in request.kernels.items()
                 if isinstance(v, (str, os.PathLike)) or (isinstance(v, list) and all(isinstance(i, str) for i in v))}
        if named:
            saved["kernels"] = named
    return saved or None

