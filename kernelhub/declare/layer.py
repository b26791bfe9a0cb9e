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

import torch


_DECLARED: set[str] = set()


def layer(name: str):
    """Class decorator declaring a swappable layer called `name`."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"layer name must be an identifier like 'RMSNorm', got {name!r}")

    def mark(cls):
        cls.kernel_layer_name = name
        _DECLARED.add(name)
        return cls

    return mark


def declared_layer_names() -> set[str]:
    """Names declared with `@layer` by every class imported so far."""
    return set(_DECLARED)


def layer_name(module) -> str | None:
    """The declared layer name of a module instance, or None for ordinary modules."""
    return getattr(type(module), "kernel_layer_name", None)


def set_layer_forward(module, forward) -> None:
    """Make `module` run `forward` (an unbound function taking self) instead of its own."""
    module.forward = types.MethodType(forward, module)


# Kernels may cache per-instance state (a packed weight, say) in attributes with this prefix;
# unbinding drops them so memory is returned with the binding.
KERNEL_CACHE_PREFIX = "_kernelhub_cache_"


def reset_layer_forward(module) -> None:
    """Undo `set_layer_forward`: the class's reference forward runs again."""
    module.__dict__.pop("forward", None)
    for name in [n for n in module.__dict__ if n.startswith(KERNEL_CACHE_PREFIX)]:
        del module.__dict__[name]


@layer("Linear")
class Linear(torch.nn.Linear):
    """nn.Linear, declared swappable (for example with the oneDNN packed-weight kernel on CPU)."""
