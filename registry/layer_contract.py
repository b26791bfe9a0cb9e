"""What a layer kernel must be, and what it can do, as data checked at bind time.

Every layer kernel, in-process, local or from the Hub, is an `nn.Module` subclass (not
`nn.Module` itself) whose `forward` takes what the declared layer's reference `forward`
takes. Its capabilities are read once into `LayerCapabilities`, from the attributes Hugging
Face `kernels` layers declare (`has_backward`, `can_torch_compile`) plus kernelhub's
`devices` and `dtypes`:

    class MyRMSNorm(torch.nn.Module):
        devices = ("cpu", "cuda")           # default: any device
        dtypes = (torch.float32,)           # default: any dtype
        has_backward = False                # default: True
        can_torch_compile = True            # default: True in-process, False from the Hub

>>> class Half(torch.nn.Module):
...     can_torch_compile = False
...     def forward(self, x):
...         return x / 2
>>> layer_capabilities(Half, hub=False).compile
False
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

from kernelhub.registry.modes import Mode


@dataclasses.dataclass(frozen=True)
class LayerCapabilities:
    """A layer kernel's capabilities (None: any)."""

    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    backward: bool = True
    compile: bool = True


def layer_capabilities(impl, *, hub: bool) -> LayerCapabilities:
    """Read `impl`'s declared capabilities once; Hub kernels follow `kernels`' defaults."""
    devices = getattr(impl, "devices", None)
    dtypes = getattr(impl, "dtypes", None)
    return LayerCapabilities(tuple(devices) if devices else None, tuple(dtypes) if dtypes else None,
                             bool(getattr(impl, "has_backward", True)),
                             bool(getattr(impl, "can_torch_compile", not hub)))


def layer_reasons(caps: LayerCapabilities, device: torch.device, dtype, mode: Mode) -> list[str]:
    """Every reason a kernel with `caps` cannot serve on `device`/`dtype` in `mode`."""
    reasons = []
    if caps.devices and device.type not in caps.devices:
        reasons.append(f"runs on {', '.join(caps.devices)}, not {device.type}")
    if caps.dtypes and dtype not in caps.dtypes:
        reasons.append(f"supports {', '.join(str(d).removeprefix('torch.') for d in caps.dtypes)}, "
                       f"not {str(dtype).removeprefix('torch.')}")
    if mode.training and not caps.backward:
        reasons.append("has_backward=False, cannot train")
    if mode.compile and not caps.compile:
        reasons.append("can_torch_compile=False")
    return reasons


def _params(fn):
    return [p for p in inspect.signature(fn).parameters.values()]


def contract_problems(impl, declared_cls, *, hub: bool) -> list[str]:
    """Why `impl` cannot replace the forward of `declared_cls`; [] if it can.

    Hub and local kernels also follow the `kernels` layer contract: stateless (no
    `__init__`), nothing but `forward` and the capability attributes.
    """
    if not isinstance(impl, type) or not issubclass(impl, torch.nn.Module):
        return [f"{getattr(impl, '__name__', repr(impl))} is not an nn.Module subclass (a layer kernel is a class "
                f"with forward(self, ...) like {declared_cls.__name__}'s)"]
    if impl is torch.nn.Module or impl.forward is torch.nn.Module.forward:
        return [f"{impl.__name__} defines no forward of its own"]
    problems = []
    if hub:
        if impl.__init__ is not torch.nn.Module.__init__:
            problems.append(f"{impl.__name__} defines __init__; layer kernels must be stateless and read the "
                            "host module's attributes")
        # nn.Module's members now (libraries such as transformers add some at import), as kernels does.
        module_members = {n for n, _ in inspect.getmembers(torch.nn.Module)}
        allowed = {"can_torch_compile", "has_backward", "devices", "dtypes"}
        extra = sorted({n for n, _ in inspect.getmembers(impl)} - module_members - allowed)
        if extra:
            problems.append(f"{impl.__name__} defines {', '.join(extra)}; the kernels layer contract allows only "
                            "forward, has_backward and can_torch_compile")
    params, ref_params = _params(impl.forward), _params(declared_cls.forward)
    if [p.kind for p in params] != [p.kind for p in ref_params]:
        names = lambda ps: "(" + ", ".join(p.name for p in ps) + ")"  # noqa: E731
        problems.append(f"forward{names(params)} does not match {declared_cls.__name__}.forward{names(ref_params)}")
    return problems
