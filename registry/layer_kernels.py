"""Choosing a kernel for each `@layer`-declared module from the `kernels=` request.

    kernels = {"RMSNorm": MyRMSNorm}                   an in-process implementation (nn.Module class)
    kernels = {"RMSNorm": "fast"}                      a kernel a plugin registered for RMSNorm
    kernels = {"model.layers.0.*": ...}                per module-path glob (wins over the layer name)
    kernels = {"RMSNorm": ["fast", "reference"]}       a fallback chain: the first that fits

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


def _candidate(value, layer: str, registry, origin: str) -> Candidate:
    if value is None or value == REFERENCE:
        return Candidate(REFERENCE, None, "model", None)
    if isinstance(value, str):
        if "/" in value or value.startswith("."):
            raise KernelhubError(
                f"{origin}: {value!r} is a Hub repo or local kernel directory; loading layer kernels from the Hub "
                "or from disk is not available in this version of kernelhub. Pass an implementation class or a "
                "plugin-registered kernel name")
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


def parse_kernels(kernels, layers: dict, registry) -> KernelSpec:
    """Validate the `kernels=` request against the model's declared layers (path -> module)."""
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
        candidates = [_candidate(v, layer, registry, f"kernels[{key!r}]") for v in chain]
        origins[key] = repr(value if isinstance(value, (str, list)) else getattr(value, "__name__", value))
        if key in names:
            by_layer[key] = candidates
        else:
            by_path.append((key, candidates))
    return KernelSpec(by_layer, tuple(by_path), origins)


def _reasons(candidate: Candidate, mode: str, device, dtype) -> list[str]:
    impl, reasons = candidate.impl, []
    if impl is None:
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
    if mode == "compile" and not getattr(impl, "can_torch_compile", True):
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
