"""`@layer("Name")`: mark an nn.Module class as a swappable layer.

The class's own `forward` is the reference semantics. The decorator sets
`kernel_layer_name`, the attribute Hugging Face `kernels.kernelize` looks for, so both
kernelhub and `kernels` can replace the forward of an instance with a kernel's.
Keep transformers' attribute names (`weight`, `variance_epsilon`, `bias`): kernels read
the host module's state by those names.

>>> import torch
>>> @layer("Doubler")
... class Doubler(torch.nn.Module):
...     def forward(self, x):
...         return 2 * x
>>> Doubler.kernel_layer_name
'Doubler'
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TypeVar

import torch

_Layer = TypeVar("_Layer", bound=type)

_DECLARED: dict[str, type] = {}  # name -> the first class declared under it


def _ours(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "kernelhub"


def layer(name: str) -> Callable[[_Layer], _Layer]:
    """Class decorator declaring a swappable layer called `name`.

    A name is one contract: inside kernelhub, a second class under a name already declared is an
    error at import (put the reference in `kernelhub.declare.reference_layers` and import it; give
    different math its own name). A user's own model may declare its own class under any name;
    kernels bound to it are then checked against that class's forward.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"layer name must be an identifier like 'RMSNorm', got {name!r}")

    def mark(cls: _Layer) -> _Layer:
        first = _DECLARED.setdefault(name, cls)
        if first is not cls and _ours(cls) and _ours(first) and first.__qualname__ != cls.__qualname__:
            raise TypeError(f"layer {name!r} is already declared by {first.__module__}.{first.__qualname__}; "
                            f"{cls.__module__}.{cls.__qualname__} must import it from "
                            "kernelhub.declare.reference_layers, or declare its different math under another name")
        cls.kernel_layer_name = name
        return cls

    return mark


def declared_layer_names() -> set[str]:
    """Names declared with `@layer` by every class imported so far."""
    return set(_DECLARED)


def layer_name(module: torch.nn.Module) -> str | None:
    """The declared layer name of a module instance, or None for ordinary modules."""
    return getattr(type(module), "kernel_layer_name", None)


def set_layer_forward(module: torch.nn.Module, forward: Callable[..., object]) -> None:
    """Make `module` run `forward` (an unbound function taking self) instead of its own."""
    module.forward = types.MethodType(forward, module)


# Kernels may cache per-instance state (a packed weight, say) in attributes with this prefix;
# unbinding drops them so memory is returned with the binding.
KERNEL_CACHE_PREFIX = "_kernelhub_cache_"


def drop_kernel_caches(module: torch.nn.Module) -> None:
    """Forget what a kernel cached on `module` (memory returns with the binding that made it)."""
    for name in [n for n in module.__dict__ if n.startswith(KERNEL_CACHE_PREFIX)]:
        del module.__dict__[name]
