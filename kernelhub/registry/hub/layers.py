"""Layer kernels from Hub repos and local directories: the `layers.<Name>` contract.

A kernel repo exposes `layers.RMSNorm` (say): an `nn.Module` subclass without its own
`__init__` whose `forward` takes the same arguments as the declared layer's and reads the
host module's state (`weight`, `variance_epsilon`, ...). It may declare `has_backward`
(default True) and `can_torch_compile` (default False), as in Hugging Face `kernels`. A repo with
transformers' GGUF kernel API instead (`mul_mat_vec`, `dequantize`, `get_rows`) serves
`QuantizedLinear` through `ggml_api`.

Problems found while loading (no variant for this platform, an import error, a missing
layer, a signature mismatch) are returned as reasons, so a fallback chain can move on and
the plan records why; an untrusted repo, a lock mismatch, a variant holding symlinks or
bytecode, or a malformed reference is raised at once.
"""

from __future__ import annotations

import torch

from kernelhub.declare.errors import REFUSALS, KernelhubError
from kernelhub.registry.hub.ggml_api import ggml_layer
from kernelhub.registry.hub.loader import load_kernel
from kernelhub.registry.hub.ref import HubRef, parse_kernel_ref
from kernelhub.registry.layer_contract import contract_problems


def load_hub_layer(value, layer: str, declared_cls, device, lock, origin: str):
    """(name, impl or None, source, problems, note) for a Hub ref or local dir naming a layer kernel; `note`
    says how long verifying its closure took in this bind (for the plan)."""
    ref = parse_kernel_ref(value, origin)
    symbol = ref.symbol or layer
    name = str(ref) if ref.symbol else f"{ref}:{symbol}"
    try:
        loaded = load_kernel(ref, device, lock)
    except REFUSALS:  # never a quiet fallback
        raise
    except KernelhubError as e:
        return name, None, "hub" if isinstance(ref, HubRef) else "local", [str(e)], ""
    layers = getattr(loaded.module, "layers", None)
    if getattr(layers, symbol, None) is None:  # transformers' GGUF kernel API serves QuantizedLinear (ggml_api)
        impl, problems = ggml_layer(loaded.module, symbol, loaded.source)
        if impl is not None or problems:
            return name, impl, loaded.source, problems or contract_problems(impl, declared_cls, hub=True), loaded.note
    if layers is None:
        return name, None, loaded.source, [f"{loaded.source} has no `layers` module (the kernels layer contract)"], ""
    impl = getattr(layers, symbol, None)
    if impl is None:
        found = sorted(n for n, v in vars(layers).items() if isinstance(v, type) and issubclass(v, torch.nn.Module))
        return name, None, loaded.source, [f"{loaded.source} has no layer {symbol!r} "
                                           f"(layers: {', '.join(found) or 'none'})"], ""
    return name, impl, loaded.source, contract_problems(impl, declared_cls, hub=True), loaded.note
