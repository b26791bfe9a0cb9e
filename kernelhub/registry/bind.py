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

from kernelhub.declare.errors import REFUSALS, BindError, KernelhubError
from kernelhub.declare.binding import ModelBinding, changing, own_forward, publish, set_own_forward
from kernelhub.declare.layer import drop_kernel_caches, layer_name
from kernelhub.declare.log import first_time
from kernelhub.declare.eager import eager_attention
from kernelhub.declare.site import AttentionSite, SiteBinding
from kernelhub.registry.bind_layers import layer_decisions
from kernelhub.registry.capabilities import on_device, unsupported
from kernelhub.registry.choose import Option, choose
from kernelhub.registry.conformance import check_attention
from kernelhub.declare.forward_only import no_backward_reason
from kernelhub.registry.hub.attention import hub_backend
from kernelhub.registry.hub.fetch import hub_budget
from kernelhub.registry.hub.lockfile import KernelLock
from kernelhub.registry.hub.ref import is_local_ref, looks_like_kernel_ref
from kernelhub.registry.modes import Mode, ModeLike, parse_mode
from kernelhub.registry.plan import BindingPlan, BindRequest, _collapse
from kernelhub.registry.plugins import get_registry
from kernelhub.registry.request import (KNOWN_LAYER_TYPES, AttnImplementation, Kernels, glob_matches,
                                       parse_attn_implementation)
from kernelhub.registry.watch import watch_moves

logger = logging.getLogger(__name__)


def _device_and_dtype(model, device, dtype):
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:  # torch's own text lists every device type it knows
        raise BindError(f"device={device!r} is not a torch device ({str(e).splitlines()[0]}); pass a "
                        "torch.device or a string such as 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type == "meta":
        device = torch.device("cpu")
    return device, _dtype(dtype) or (param.dtype if param is not None else torch.float32)


def _dtype(dtype):
    """A torch.dtype from a dtype or its name ('float32', 'torch.bfloat16'); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.") if isinstance(dtype, str) else ""
    found = getattr(torch, name, None) if name.isidentifier() else None
    if not isinstance(found, torch.dtype):
        raise BindError(f"dtype={dtype!r} is not a dtype; pass a torch.dtype or its name, such as torch.bfloat16 "
                        "or 'float32'")
    return found


def _read_lock(lock):
    if lock is None:
        return KernelLock.from_env()
    return lock if isinstance(lock, KernelLock) else KernelLock.read(lock)  # LockError for what is not a path


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
                    memo[name] = Option(name, "local" if is_local_ref(name) else "hub", problems=(str(e),))
                    return memo[name]
            else:
                registered = registry.get(name)
            memo[name] = Option(registered.backend.name, registered.source, registered)
        return memo[name]

    return load


def _site_binding(backend, resolution, device, mode: Mode) -> SiteBinding:
    caps = backend.capabilities.on(device.type)
    forward_only = "" if mode.training or on_device(caps.backward, device.type) else \
        no_backward_reason(backend.name, device.type)
    return SiteBinding(backend.name, resolution.fn, backend.mask_format, backend.accepts_is_causal,
                       caps.returns_weights, resolution.paged_fn, forward_only)


def _hub_verdict(backend, device, dtype, mode):
    record = _site_binding(backend, backend.resolution(device, dtype), device, mode)
    reference = SiteBinding("eager", eager_attention, "bool", returns_weights=True)
    return check_attention(record, reference, dtype, device)


def _attention_decisions(model, attn_implementation, registry, device, dtype, mode, lock, verify=True):
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
            backend = option.payload.backend
            why = unsupported(backend, site, device, dtype, mode)
            if chain.paged and not backend.capabilities.on(device.type).paged:
                why.append("does not support a paged KV cache (asked for 'paged|...')")
            if not why and verify and looks_like_kernel_ref(option.name):  # Hub/local code: probed first
                verdict = _hub_verdict(backend, device, dtype, mode)
                if not verdict.ok:
                    why.append(verdict.reason())
            return why

        def pick(fitting, site=site):
            picked = registry.pm.hook.kernelhub_select_backend(
                site=site, candidates=[o.payload.backend.name for o in fitting], device=device, dtype=dtype,
                mode=str(mode))
            return next((o for o in fitting if o.payload.backend.name == picked), fitting[0])

        entry, option = choose("attention", path, key if key != "*" else None, chain, load, reasons,
                               device=device, dtype=dtype, mode=mode, pick=pick,
                               valid=RunnableBackends(registry, device))
        backend = option.payload.backend
        resolution = backend.resolution(device, dtype)
        verified = _hub_verdict(backend, device, dtype, mode).note() \
            if verify and looks_like_kernel_ref(option.name) else ""
        note = "; ".join(n for n in (entry.note, resolution.note, verified) if n)
        entries.append(dataclasses.replace(entry, note=note))
        actions.append((site, _site_binding(backend, resolution, device, mode)))
    return entries, actions


class RunnableBackends:
    """The error hint listing the registered backends that can run on `device` (never one that
    cannot, such as flash on a CPU); computed only when an error is shown."""

    def __init__(self, registry, device):
        self.registry, self.device = registry, device

    def __str__(self):
        from kernelhub.registry.capabilities import machine_problems

        kind = torch.device(self.device).type
        usable = [r.backend.name for r in self.registry.backends() if not machine_problems(r.backend, kind)]
        return f"Valid backends: {', '.join(usable) or 'none'} (those that run on {kind})"


def decide(model: torch.nn.Module, attn_implementation: AttnImplementation | None = None,
           kernels: Kernels | None = None, *, device: torch.device | str | None = None,
           dtype: torch.dtype | str | None = None, mode: ModeLike = "inference",
           lock: KernelLock | str | os.PathLike | None = None, verify: bool = True) -> Decisions:
    """Everything `bind` would do to `model`, checked; raises before anything changes."""
    mode = parse_mode(mode)
    registry = get_registry()
    device, dtype = _device_and_dtype(model, device, dtype)
    lock = _read_lock(lock)
    kernels = _with_packed_defaults(model, kernels)
    with hub_budget():  # one Hub deadline for the whole bind, however many refs it names
        entries, site_actions = _attention_decisions(model, attn_implementation, registry, device, dtype, mode, lock,
                                                     verify)
        layer_entries, layer_actions = layer_decisions(model, kernels, registry, device, dtype, mode, lock, verify)
    request = BindRequest(attn_implementation, kernels, mode, lock, verify)
    tp = getattr(model, "tensor_parallel", None)  # the plan records each module's shard on this rank
    all_entries = tuple(entries) + tuple(layer_entries)
    if tp is not None:
        all_entries = tuple(dataclasses.replace(e, sharding=tp.describe(e.path)) for e in all_entries)
    plan = BindingPlan(all_entries, device=str(device),
                       dtype=str(dtype).removeprefix("torch."), mode=mode, request=request,
                       tensor_parallel=tp.to_dict() if tp is not None else None)
    return Decisions(plan, tuple(site_actions), tuple(layer_actions))


def _with_packed_defaults(model, kernels):
    """`kernels`, with packed GGUF layers (QuantizedLinear, QuantizedEmbedding) the model holds keeping
    their `gguf` kernels where `kernels` is silent on them: from_pretrained puts those in its request,
    and a later bind naming only other layers must not drop them to the reference (which unpacks a
    whole weight at every call)."""
    if not any(layer_name(m) in ("QuantizedLinear", "QuantizedEmbedding") for m in model.modules()):
        return kernels
    from kernelhub.checkpoint.gguf_packed import with_packed_kernels

    return with_packed_kernels(kernels, model)


def apply(model: torch.nn.Module, decisions: Decisions) -> BindingPlan:
    """Install what `decide` chose: cannot fail half-way. The model's record is published last, in
    one statement, so a forward running meanwhile sees the old binding or the new one, whole."""
    with changing(model):  # a compiled generate call running on the model finishes first
        return _apply(model, decisions)


def _apply(model, decisions: Decisions) -> BindingPlan:
    for site, record in decisions.sites:
        site.set_binding(record)
    for module, forward in decisions.layers:
        if own_forward(module) is not forward:
            drop_kernel_caches(module)  # what the previous kernel cached on the module
        set_own_forward(module, forward)
    publish(model, ModelBinding({id(site): record for site, record in decisions.sites},
                                {id(module): forward for module, forward in decisions.layers}))
    model.binding = decisions.plan.watching(decisions.layers)
    model.binding_request = _serialisable_request(decisions.plan.request)
    watch_moves(model, rebind, apply)
    _log_binding(model, decisions.plan)
    return model.binding


def bind(model: torch.nn.Module, attn_implementation: AttnImplementation | None = None,
         kernels: Kernels | None = None, *, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None, mode: ModeLike = "inference",
         lock: KernelLock | str | os.PathLike | None = None, verify: bool = True) -> BindingPlan:
    """Bind every attention site and declared layer of `model`; returns the `BindingPlan`.

    Also sets `model.binding` (the plan) and `model.binding_request` (what was asked,
    saved by `save_pretrained` so a reload binds the same way). `mode` is a `Mode` (or
    'inference', 'training', 'compile', a `kernels.Mode`); `lock` (a path or `KernelLock`;
    default $KERNELHUB_LOCK) pins and verifies every Hub and local kernel. Every layer kernel and Hub
    attention kernel first runs a conformance probe against the reference it replaces
    (`kernelhub.registry.conformance`); `verify=False` skips that, to bind a wrong kernel on purpose.
    """
    return apply(model, decide(model, attn_implementation, kernels, device=device, dtype=dtype, mode=mode,
                               lock=lock, verify=verify))


def rebind(model: torch.nn.Module, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           kernels: Kernels | None = None, verify: bool | None = None) -> Decisions:
    """The decisions that re-create `model`'s binding with one thing changed (device, dtype, or
    extra kernels); mode, lock and in-process kernels are kept."""
    request: BindRequest = model.binding.request
    merged = {**(request.kernels or {}), **kernels} if kernels else request.kernels
    return decide(model, request.attn_implementation, merged, device=device or model.binding.device,
                  dtype=dtype or getattr(torch, model.binding.dtype), mode=request.mode, lock=request.lock,
                  verify=request.verify if verify is None else verify)


def unbind(model: torch.nn.Module) -> None:
    """Return every site and layer of `model` to its eager reference."""
    with changing(model):
        _unbind(model)


def _unbind(model) -> None:
    sites, layers = {}, {}
    for module in model.modules():
        if isinstance(module, AttentionSite):
            module.unbind()
            sites[id(module)] = module.binding
        elif layer_name(module):
            drop_kernel_caches(module)
            set_own_forward(module, None)
            layers[id(module)] = None
    publish(model, ModelBinding(sites, layers))
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

