"""Layer kernels from Hub repos and local directories: the `layers.<Name>` contract.

A kernel repo exposes `layers.RMSNorm` (say): an `nn.Module` subclass without its own
`__init__` whose `forward` takes the same arguments as the declared layer's and reads the
host module's state (`weight`, `variance_epsilon`, ...). It may declare `has_backward`
(default True) and `can_torch_compile` (default False), as in Hugging Face `kernels`.

Problems found while loading (no variant for this platform, an import error, a missing
layer, a signature mismatch) are returned as reasons, so a fallback chain can move on and
the plan records why; an untrusted repo, a lock mismatch, a variant holding symlinks or
bytecode, or a malformed reference is raised at once.
"""

from __future__ import annotations

import inspect

import torch

from kernelhub.registry.errors import KernelhubError
from kernelhub.registry.hub.loader import load_kernel
from kernelhub.registry.hub.lockfile import LockError
from kernelhub.registry.hub.ref import HubRef, parse_kernel_ref
from kernelhub.registry.hub.snapshot import UnsafeKernelError
from kernelhub.registry.hub.trust import UntrustedKernelError


def contract_problems(impl, declared_cls) -> list[str]:
    """Why `impl` cannot replace the forward of `declared_cls`; [] if it can."""
    if not isinstance(impl, type) or not issubclass(impl, torch.nn.Module):
        return [f"{impl!r} is not an nn.Module subclass"]
    problems = []
    if impl.__init__ is not torch.nn.Module.__init__:
        problems.append(f"{impl.__name__} defines __init__; layer kernels must be stateless and read the "
                        "host module's attributes")
    # nn.Module's members now (libraries such as transformers add some at import), as kernels does.
    module_members = {n for n, _ in inspect.getmembers(torch.nn.Module)}
    extra = sorted({n for n, _ in inspect.getmembers(impl)} - module_members - {"can_torch_compile", "has_backward"})
    if extra:
        problems.append(f"{impl.__name__} defines {', '.join(extra)}; the kernels layer contract allows only forward, "
                        "has_backward and can_torch_compile")
    params = list(inspect.signature(impl.forward).parameters.values())
    ref_params = list(inspect.signature(declared_cls.forward).parameters.values())
    if [p.kind for p in params] != [p.kind for p in ref_params]:
        problems.append(f"forward{_sig(params)} does not match {declared_cls.__name__}.forward{_sig(ref_params)}")
    return problems


def _sig(params) -> str:
    return "(" + ", ".join(p.name for p in params) + ")"


def load_hub_layer(value, layer: str, declared_cls, device, lock, origin: str):
    """(name, impl or None, source, problems) for a Hub ref or local dir naming a layer kernel."""
    ref = parse_kernel_ref(value, origin)
    symbol = ref.symbol or layer
    name = str(ref) if ref.symbol else f"{ref}:{symbol}"
    try:
        loaded = load_kernel(ref, device, lock)
    except (UntrustedKernelError, LockError, UnsafeKernelError):  # refusals, never a quiet fallback
        raise
    except KernelhubError as e:
        return name, None, "hub" if isinstance(ref, HubRef) else "local", [str(e)]
    layers = getattr(loaded.module, "layers", None)
    if layers is None:
        return name, None, loaded.source, [f"{loaded.source} has no `layers` module (the kernels layer contract)"]
    impl = getattr(layers, symbol, None)
    if impl is None:
        found = sorted(n for n, v in vars(layers).items() if isinstance(v, type) and issubclass(v, torch.nn.Module))
        return name, None, loaded.source, [f"{loaded.source} has no layer {symbol!r} "
                                           f"(layers: {', '.join(found) or 'none'})"]
    return name, impl, loaded.source, contract_problems(impl, declared_cls)
