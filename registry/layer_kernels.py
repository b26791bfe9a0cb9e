"""Choosing a kernel for each `@layer`-declared module from the `kernels=` request.

    kernels = {"RMSNorm": MyRMSNorm}                   an in-process implementation (nn.Module class)
    kernels = {"RMSNorm": "fast"}                      a kernel a plugin registered for RMSNorm
    kernels = {"model.layers.0.*": ...}                per module-path glob (wins over the layer name)
    kernels = {"RMSNorm": ["fast", "reference"]}       a fallback chain: the first that fits
    kernels = {"RMSNorm": "my-org/rmsnorm@v1"}          a Hub kernel repo (`layers.RMSNorm`)
    kernels = {"RMSNorm": "./hub_kernels/rmsnorm"}      a local directory in the Hub kernel layout

An implementation follows the Hugging Face `kernels` layer contract: a class whose
`forward(self, x)` runs with `self` being the host module (so it reads `weight`,
`variance_epsilon`, ...), optionally declaring `has_backward`, `can_torch_compile`, `devices`
(device types) and `dtypes`.
"""

from __future__ import annotations

import dataclasses
import fnmatch

from kernelhub.backends.layer import layer_name
from kernelhub.registry.errors import BindError, KernelhubError, closest_first, suggestion
from kernelhub.registry.hub.layers import load_hub_layer
from kernelhub.registry.hub.ref import looks_like_kernel_ref
from kernelhub.registry.plan import PlanEntry

REFERENCE = "reference"


@dataclasses.dataclass(frozen=True)
class LayerChoice:
    entry: PlanEntry
    forward: object  # the function to install, or None for the reference forward


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    forward: object
    source: str
    impl: object
    problems: tuple = ()          # found while loading (Hub kernels): reasons it cannot serve
    compile_default: bool = True  # Hub kernels follow `kernels`: no torch.compile unless declared


def _candidate(value, layer: str, registry, origin: str, declared_cls, device, lock) -> Candidate:
    if value is None or value == REFERENCE:
        return Candidate(REFERENCE, None, "model", None)
    if looks_like_kernel_ref(value):
        name, impl, source, problems = load_hub_layer(value, layer, declared_cls, device, lock, origin)
        forward = impl.forward if impl is not None and not problems else None
        return Candidate(name, forward, source, impl, tuple(problems), compile_default=False)
    if isinstance(value, str):
        known = registry.layer_kernels.get(layer, {})
        if value not in known:
            valid = closest_first(value, [*known, REFERENCE])
            raise KernelhubError(f"{origin}: no kernel {value!r} is registered for layer {layer!r}."
                                 f"{suggestion(value, known)} Valid: {', '.join(valid)}")
        return _from_impl(known[value], value, registry.layer_kernel_sources.get((layer, value), "plugin"), origin)
    return _from_impl(value, getattr(value, "__name__", repr(value)), "in-process", origin)


def check_layer_impl(impl, origin: str):
    """The implementation's forward, or a clear error if it breaks the layer contract."""
    forward = getattr(impl, "forward", None)
    if not isinstance(impl, type) or not callable(forward):
        raise KernelhubError(f"{origin}: {impl!r} breaks the layer contract: expected a class with "
                             "forward(self, x) (like the Hugging Face kernels `layers.<Name>` classes)")
    return forward


def _from_impl(impl, name, source, origin) -> Candidate:
    return Candidate(name, check_layer_impl(impl, origin), source, impl)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    by_layer: dict   # layer name -> [Candidate, ...]
    by_path: tuple   # ((glob, [Candidate, ...]), ...)
    origins: dict    # key -> repr of what the user wrote


def parse_kernels(kernels, layers: dict, registry, device=None, lock=None) -> KernelSpec:
    """Validate the `kernels=` request against the model's declared layers (path -> module).

    Hub and local kernels are resolved and imported here, for `device`, verified against
    `lock` when one is given."""
    if kernels is None:
        return KernelSpec({}, (), {})
    if not isinstance(kernels, dict):
        raise KernelhubError(f"kernels must be a dict like {{'RMSNorm': impl}}, got {type(kernels).__name__}")
    names = sorted({layer_name(m) for m in layers.values()})
    by_layer, by_path, origins = {}, [], {}
    for key, value in kernels.items():
        if not isinstance(key, str) or not key:
            raise KernelhubError(f"kernels key {key!r} must be a layer name ({', '.join(names)}) or a module-path glob")
        matched = [p for p in layers if fnmatch.fnmatchcase(p, key)]
        if key not in names and not matched:
            raise KernelhubError(f"kernels key {key!r} names no declared layer of this model.{suggestion(key, names)} "
                                 f"Layers: {', '.join(names) or 'none'}; or use a module-path glob")
        chain = value if isinstance(value, list) else [value]
        if not chain:
            raise KernelhubError(f"kernels[{key!r}] is an empty fallback chain")
        layer = key if key in names else layer_name(layers[matched[0]])
        declared_cls = type(next(m for p, m in layers.items() if layer_name(m) == layer))
        candidates = [_candidate(v, layer, registry, f"kernels[{key!r}]", declared_cls, device, lock) for v in chain]
        origins[key] = repr(value if isinstance(value, (str, list)) else getattr(value, "__name__", value))
        if key in names:
            by_layer[key] = candidates
        else:
            by_path.append((key, candidates))
    return KernelSpec(by_layer, tuple(by_path), origins)


def _reasons(candidate: Candidate, mode: str, device, dtype) -> list[str]:
    impl, reasons = candidate.impl, list(candidate.problems)
    if impl is None or reasons:
        return reasons
    devices = getattr(impl, "devices", None)
    if devices and device.type not in devices:
        reasons.append(f"runs on {', '.join(devices)}, not {device.type}")
    dtypes = getattr(impl, "dtypes", None)
    if dtypes and dtype not in dtypes:
        reasons.append(f"supports {', '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                       f"not {str(dtype).removeprefix('torch.')}")
    if mode == "training" and not getattr(impl, "has_backward", True):
        reasons.append("has_backward=False, cannot train")
    if mode == "compile" and not getattr(impl, "can_torch_compile", candidate.compile_default):
        reasons.append("can_torch_compile=False")
    return reasons


def choose_layer_kernel(path, module, spec: KernelSpec, registry, device, dtype, mode) -> LayerChoice:
    """The kernel for one declared layer (or its reference forward)."""
    name = layer_name(module)
    key, chain = next(((g, c) for g, c in spec.by_path if fnmatch.fnmatchcase(path, g)), (None, None))
    if chain is None and name in spec.by_layer:
        key, chain = name, spec.by_layer[name]
    origin = spec.origins.get(key)
    if chain is None and name in registry.layer_defaults:  # set by the pytest plugin's swap_kernel
        impl = registry.layer_defaults[name]
        key, chain, origin = name, [_from_impl(impl, impl.__name__, "swap_kernel", f"swapped {name}")], "swap_kernel"
    if chain is None:
        return LayerChoice(PlanEntry(path, "layer", REFERENCE, f"model ({name})", "default"), None)
    rejected = []
    for candidate in chain:
        reasons = _reasons(candidate, mode, device, dtype)
        if not reasons:
            entry = PlanEntry(path, "layer", candidate.name, f"{candidate.source} ({name})", origin, tuple(rejected))
            return LayerChoice(entry, candidate.forward)
        rejected.append((candidate.name, tuple(reasons)))
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in rejected)
    raise BindError(f"no kernel in kernels[{key!r}] can serve layer {path!r} on {device.type}/"
                    f"{str(dtype).removeprefix('torch.')} in {mode} mode: {detail}. "
                    f"Add 'reference' to the chain to fall back to the model's own forward")
