"""What a layer kernel must be, and what it can do, as data checked at bind time.

Every layer kernel, in-process, local or from the Hub, is an `nn.Module` subclass (not
`nn.Module` itself) whose `forward` takes what the declared layer's reference `forward`
takes. Its capabilities are read once into `Capabilities` (the one record attention backends
use too), from the attributes Hugging Face `kernels` layers declare (`has_backward` ->
`backward`, `can_torch_compile` -> `compile`) plus kernelhub's `devices`, `dtypes` and
`supports`:

    class MyExperts(torch.nn.Module):
        devices = ("cpu", "cuda")           # default: any device
        dtypes = (torch.float32,)           # default: any dtype
        has_backward = False                # default: True
        can_torch_compile = True            # default: True in-process, False from the Hub
        supports = ("bias",)                # optional features it implements; default: none

A declared layer instance may need optional features (`kernel_requirements()`, e.g. an
`Experts` with biases needs "bias"); a kernel whose `supports` lacks one is refused for that
instance with the reason, from the layer's `requirement_notes`.

>>> class Half(torch.nn.Module):
...     can_torch_compile = False
...     def forward(self, x):
...         return x / 2
>>> layer_capabilities(Half, hub=False).compile
False
"""

from __future__ import annotations

import inspect

import torch

from kernelhub.registry.capabilities import Capabilities, on_device
from kernelhub.registry.modes import Mode

LayerCapabilities = Capabilities
"""The former name of a layer kernel's capabilities, kept for plugins: layer kernels and attention
backends share `Capabilities` (build a layer kernel's with `Capabilities.for_layer`)."""


def layer_capabilities(impl: type, *, hub: bool) -> Capabilities:
    """Read `impl`'s declared capabilities once; Hub kernels follow `kernels`' defaults."""
    devices = _items(getattr(impl, "devices", None), str)
    dtypes = _items(getattr(impl, "dtypes", None), torch.dtype)
    return Capabilities.for_layer(devices=tuple(devices) if devices else None,
                                  dtypes=tuple(dtypes) if dtypes else None,
                                  backward=bool(getattr(impl, "has_backward", True)),
                                  compile=bool(getattr(impl, "can_torch_compile", not hub)),
                                  supports=_supports(getattr(impl, "supports", ())),
                                  unsupported=None if hub else getattr(impl, "unsupported", None))


def _items(value: object, kind: type) -> tuple | None:
    """A well-formed `devices`/`dtypes` as a tuple; anything else counts as none (`contract_problems` reports it)."""
    ok = isinstance(value, (tuple, list)) and all(isinstance(v, kind) for v in value)
    return tuple(value) if ok else None


def _supports(value: object) -> tuple[str, ...]:
    """A well-formed `supports` as a tuple; anything else counts as none (`contract_problems` reports it)."""
    ok = isinstance(value, (tuple, list)) and all(isinstance(f, str) for f in value)
    return tuple(value) if ok else ()


def requirements(module: torch.nn.Module | None) -> tuple[str, ...]:
    """The optional features `module` (a declared layer instance) needs from a kernel; () for most layers."""
    needs = getattr(module, "kernel_requirements", None)
    return tuple(needs()) if needs is not None else ()


def layer_reasons(caps: Capabilities, device: torch.device, dtype: torch.dtype, mode: Mode,
                  module: torch.nn.Module | None = None, path: str = "") -> list[str]:
    """Every reason a kernel with `caps` cannot serve `module` (at `path`) on `device`/`dtype` in `mode`.

    >>> from kernelhub.declare.experts import Experts
    >>> layer_reasons(Capabilities.for_layer(), torch.device("cpu"), torch.float32, Mode.INFERENCE,
    ...               Experts(2, 4, 4, bias=True), "mlp.experts")
    ['lacks bias support; mlp.experts has expert biases']
    """
    caps = caps.on(device.type)
    notes = getattr(module, "requirement_notes", {})
    reasons = [f"lacks {need} support; {path or 'the layer'} {notes.get(need, f'needs {need}')}"
               for need in requirements(module) if need not in caps.supports]
    if caps.devices and device.type not in caps.devices:
        reasons.append(f"runs on {', '.join(caps.devices)}, not {device.type}")
    if caps.dtypes and dtype not in caps.dtypes:
        reasons.append(f"supports {', '.join(str(d).removeprefix('torch.') for d in caps.dtypes)}, "
                       f"not {str(dtype).removeprefix('torch.')}")
    if caps.unsupported is not None and not reasons:
        reasons.extend(caps.unsupported(device, dtype))
    if mode.training and not on_device(caps.backward, device.type):
        reasons.append("has_backward=False, cannot train")
    if mode.compile and not caps.compile:
        reasons.append("can_torch_compile=False, cannot run under torch.compile")
    return reasons


def _params(fn: object) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values()]


def contract_problems(impl: object, declared_cls: type, *, hub: bool) -> list[str]:
    """Why `impl` cannot replace the forward of `declared_cls`; [] if it can.

    Hub and local kernels also follow the `kernels` layer contract: stateless (no
    `__init__`), nothing but `forward` and the capability attributes.
    """
    if not isinstance(impl, type) or not issubclass(impl, torch.nn.Module):
        return [f"{getattr(impl, '__name__', repr(impl))} is not an nn.Module subclass (a layer kernel is a class "
                f"with forward(self, ...) like {declared_cls.__name__}'s)"]
    if impl is torch.nn.Module or impl.forward is torch.nn.Module.forward:
        return [f"{impl.__name__} defines no forward of its own"]
    if not callable(impl.forward):
        return [f"{impl.__name__}.forward is {impl.forward!r} ({type(impl.forward).__name__}); a layer kernel's "
                f"forward is a method, def forward(self, ...) like {declared_cls.__name__}'s"]
    problems = []
    for attr, kind, example in (("devices", str, "('cpu', 'cuda')"), ("dtypes", torch.dtype, "(torch.float32,)")):
        value = getattr(impl, attr, None)
        if value is not None and _items(value, kind) is None:
            problems.append(f"{impl.__name__}.{attr} is {value!r}; allowed: a tuple such as {example}, or no "
                            f"{attr} attribute for any")
    if hub:
        if impl.__init__ is not torch.nn.Module.__init__:
            problems.append(f"{impl.__name__} defines __init__; layer kernels must be stateless and read the "
                            "host module's attributes")
        # nn.Module's members now (libraries such as transformers add some at import), as kernels does.
        module_members = {n for n, _ in inspect.getmembers(torch.nn.Module)}
        allowed = {"can_torch_compile", "has_backward", "devices", "dtypes", "supports"}
        extra = sorted({n for n, _ in inspect.getmembers(impl)} - module_members - allowed)
        if extra:
            problems.append(f"{impl.__name__} defines {', '.join(extra)}; the kernels layer contract allows only "
                            "forward, has_backward and can_torch_compile (kernelhub adds devices, dtypes, supports)")
    supports = getattr(impl, "supports", ())
    if not isinstance(supports, (tuple, list)) or not all(isinstance(f, str) for f in supports):
        problems.append(f"{impl.__name__}.supports is {supports!r}; allowed: a tuple of feature names such as "
                        "('bias', 'swiglu_clamped')")
    params, ref_params = _params(impl.forward), _params(declared_cls.forward)
    if [p.kind for p in params] != [p.kind for p in ref_params]:
        names = lambda ps: "(" + ", ".join(p.name for p in ps) + ")"  # noqa: E731
        problems.append(f"forward{names(params)} does not match {declared_cls.__name__}.forward{names(ref_params)}")
    return problems
