"""Choosing a kernel for each `@layer`-declared module from the `kernels=` request.

The values a chain may hold:

    MyRMSNorm                       an in-process class (an nn.Module subclass)
    "fast"                          a kernel a plugin registered for this layer
    "my-org/rmsnorm@v1[:RMSNorm]"   a Hub kernel repo (`layers.<Symbol>`)
    "./hub_kernels/rmsnorm[:RMSNorm]"  a local directory in the Hub kernel layout
    "reference"                     the model's own forward

Under a layer-name key every value serves that layer. Under a module-path glob a value
serves the layer it names: a Hub or local ref by its `:Symbol`, a class by its
`kernel_layer_name`, a registered name by where it is registered; the glob then reaches
only modules of that layer. Every kernel is checked against the declared layer's contract
and its capabilities (`layer_contract`) before anything is applied.
"""

from __future__ import annotations

from pathlib import Path

from kernelhub.declare.errors import KernelhubError, closest_first, suggestion
from kernelhub.declare.layer import declared_layer_names, layer_name
from kernelhub.registry.choose import Option, choose
from kernelhub.registry.conformance import check_layer
from kernelhub.registry.hub.layers import load_hub_layer
from kernelhub.registry.hub.ref import looks_like_kernel_ref, parse_kernel_ref
from kernelhub.registry.layer_contract import contract_problems, layer_capabilities, layer_reasons
from kernelhub.registry.plan import PlanEntry
from kernelhub.registry.request import REFERENCE, Chain, glob_matches, parse_kernels


def served_layer(value, registry, layers: set[str]):
    """The layer name `value` implements: a name, a set of names (registered kernels), or None if unknown."""
    if value == REFERENCE:
        return "*"
    if looks_like_kernel_ref(value):
        return parse_kernel_ref(value, "kernels").symbol
    if isinstance(value, str):
        return {layer for layer in layers if value in registry.layer_kernels.get(layer, {})} or None
    return getattr(value, "kernel_layer_name", None)


def _serves(served, layer: str) -> bool:
    return served == "*" or served == layer or (isinstance(served, set) and layer in served)


def _served_by_glob(request, layers: dict, registry) -> dict:
    """glob -> the layer each of its chain's values implements; a clear error when a value's
    layer is unknown and the modules the glob reaches do not settle it, or when the glob
    reaches no module of the layers its kernels implement."""
    names = {layer_name(m) for m in layers.values()}
    served_by = {}
    for glob, chain in request.by_glob:
        reached = {layer_name(m) for p, m in layers.items() if glob_matches(glob, p)}
        served = []
        for value in chain.values:
            layer = served_layer(value, registry, names)
            if layer is None and len(reached) == 1:  # an exact path (or a uniform glob) settles it
                layer = next(iter(reached))
            if layer is None:
                raise KernelhubError(f"kernels[{glob!r}]: {value!r} does not say which layer it implements, and the "
                                     f"glob reaches {', '.join(sorted(reached)) or 'no declared layer'}. Name it: "
                                     "'./dir:RMSNorm' or 'org/name@v1:RMSNorm' for a kernel repo, "
                                     "kernel_layer_name = 'RMSNorm' on a class")
            served.append(layer)
        if not any(_serves(s, layer) for s in served for layer in reached if s != "*") and \
                not (all(s == "*" for s in served) and reached):
            raise KernelhubError(f"kernels[{glob!r}] reaches no layer its kernels implement: it matches "
                                 f"{', '.join(sorted(reached)) or 'no declared layer'}, its kernels are for "
                                 f"{', '.join(sorted(str(s) for s in served if s != '*'))}")
        served_by[glob] = tuple(served)
    return served_by


def _for_layer(chain: Chain, served: tuple, layer: str) -> Chain | None:
    """The part of a glob's chain that serves `layer`, or None when none of its kernels is for it
    (a chain of only 'reference' serves every module the glob matches)."""
    if all(s == "*" for s in served):
        return chain
    if not any(s != "*" and _serves(s, layer) for s in served):
        return None
    return Chain(tuple(v for v, s in zip(chain.values, served) if _serves(s, layer)), chain.explicit, chain.origin)


def _loader(registry, device, lock):
    memo = {}

    def load_for(layer: str, declared_cls, origin: str):
        def load(value) -> Option:
            key = (layer, value if isinstance(value, str) else id(value))
            if key not in memo:
                memo[key] = _load(value, layer, declared_cls, origin, registry, device, lock)
            return memo[key]
        return load

    return load_for


def _load(value, layer, declared_cls, origin, registry, device, lock) -> Option:
    if value == REFERENCE:
        return Option(REFERENCE, "model")
    if looks_like_kernel_ref(value):
        name, impl, source, problems, note = load_hub_layer(value, layer, declared_cls, device, lock, origin)
        symbol = parse_kernel_ref(value, origin).symbol
        problems = [*problems, *_names_another_layer(symbol if symbol in declared_layer_names() else None, layer)]
        caps = layer_capabilities(impl, hub=True) if impl is not None else None
        return Option(name, source, impl, tuple(problems), caps, note)
    if isinstance(value, str):
        known = registry.layer_kernels.get(layer, {})
        if value not in known and Path(value).is_dir():  # local or Hub is never guessed
            raise KernelhubError(f"{origin}: a directory {value} exists; write ./{value} to use it as a local "
                                 f"kernel (a bare name means a kernel registered for layer {layer!r})")
        if value not in known:
            valid = closest_first(value, [*known, REFERENCE])
            raise KernelhubError(f"{origin}: no kernel {value!r} is registered for layer {layer!r}."
                                 f"{suggestion(value, known)} Valid: {', '.join(valid)}")
        impl, source = known[value], registry.layer_kernel_sources.get((layer, value), "plugin")
        name = value
    else:
        impl, source, name = value, "in-process", getattr(value, "__name__", repr(value))
    problems = contract_problems(impl, declared_cls, hub=False)
    if not isinstance(value, str):  # a registered name is registered for this layer
        problems += _names_another_layer(getattr(impl, "kernel_layer_name", None), layer)
    caps = layer_capabilities(impl, hub=False) if not problems else None
    return Option(name, source, impl, tuple(problems), caps)


def _names_another_layer(named: str | None, layer: str) -> list[str]:
    """A kernel that names the declared layer it implements (a class's `kernel_layer_name`, a ref's
    `:Symbol` that is a declared layer name) serves only that layer: layer names say the semantics,
    so an `RMSNorm` kernel never runs Gemma's `(1 + weight)` `GemmaRMSNorm`."""
    if named is None or named == layer:
        return []
    return [f"implements layer {named!r}, not {layer!r}; a kernel serves only the layer it names "
            "(their semantics differ)"]


def _reasons(option, module, path, device, dtype, mode, verify) -> list[str]:
    """Why `option` cannot serve `module`: its capabilities first; then, if it could, its conformance
    probe against the layer's reference (never run for a kernel refused before it)."""
    if option.payload is None:
        return []
    why = layer_reasons(option.caps, device, dtype, mode, module, path)
    if not why and verify:
        verdict = check_layer(option.payload.forward, module, dtype, device)
        if not verdict.ok:
            why.append(verdict.reason())
    return why


def layer_decisions(model, kernels, registry, device, dtype, mode, lock, verify: bool = True):
    """([PlanEntry], [(module, forward or None)]) for every declared layer of `model`; with `verify`,
    every kernel passes its conformance probe before it is chosen."""
    layers = {path: m for path, m in model.named_modules() if layer_name(m)}
    names = {layer_name(m) for m in layers.values()}
    request = parse_kernels(kernels, names)
    served_by = _served_by_glob(request, layers, registry)
    load_for = _loader(registry, device, lock)
    for key, chain in request.by_name.items():  # every value is checked, even where an earlier one fits
        declared_cls = type(next(m for m in layers.values() if layer_name(m) == key))
        for value in chain.values:
            load_for(key, declared_cls, f"kernels[{key!r}]")(value)
    entries, actions = [], []
    for path, module in layers.items():
        name = layer_name(module)
        key, chain = request.lookup(path, name, applies=lambda glob, chain, name=name: _for_layer(
            chain, served_by[glob], name) is not None)
        if key in served_by:
            chain = _for_layer(chain, served_by[key], name)
        default = registry.layer_defaults.get(name) if chain is None else None
        if default is not None:  # the registry's default kernel for this layer (swap_kernel sets one)
            key, chain = name, Chain((default.impl,), True, default.source)
        own = getattr(module, "kernel_plan_note", None)  # what the module says of itself (a GGUF type)
        own = own() if callable(own) else None
        if chain is None:
            entries.append(PlanEntry(path, "layer", REFERENCE, f"model ({name})", "default", note=own or ""))
            actions.append((module, None))
            continue
        checked = verify and (default is None or default.verify)
        entry, option = choose("layer", path, key, chain, load_for(name, type(module), f"kernels[{key!r}]"),
                               lambda o, module=module, path=path, checked=checked: _reasons(
                                   o, module, path, device, dtype, mode, checked),
                               device=device, dtype=dtype, mode=mode)
        source = default.source if default is not None else entry.source
        note = "; ".join(n for n in (own, entry.note) if n)
        if option.payload is not None:
            verdict = check_layer(option.payload.forward, module, dtype, device) if checked else None
            note = "; ".join(n for n in (note, verdict.note() if verdict else "not verified (verify=False)") if n)
        entries.append(PlanEntry(entry.path, "layer", entry.chosen, f"{source} ({name})", entry.request,
                                 entry.rejected, note))
        actions.append((module, option.payload.forward if option.payload is not None else None))
    return entries, actions
