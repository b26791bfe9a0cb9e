"""Attention kernels from the Hub: `attn_implementation="org/repo@rev:symbol"`.

The repo's `kernelhub.json` declares each attention function's mask format and
capabilities (read before import); the function then serves sites like any registered
backend, with the same `unsupported()` checks. A repo exposing the flash-attn varlen API
(`flash_attn_varlen_func`) is recognised as flash-style and adapted to packed sequences;
a declaration for it only refines the capabilities. Hub backends are not added to the registry: binding one
leaves the registry as it was.
"""

from __future__ import annotations

import torch

from kernelhub.backends.flash_style import flash_varlen_attention
from kernelhub.backends.resolution import Resolution
from kernelhub.registry.capabilities import AttentionBackend, Capabilities
from kernelhub.registry.hub.fetch import HubKernelError
from kernelhub.registry.hub.loader import load_kernel
from kernelhub.registry.hub.ref import parse_kernel_ref
from kernelhub.registry.plugins import Registered

FLASH_VARLEN = "flash_attn_varlen_func"


def flash_capabilities(device_type: str) -> Capabilities:
    """What the flash-attn varlen API supports: fp16/bf16, GQA, window, softcap; no weights."""
    return Capabilities(devices=(device_type,), dtypes=(torch.float16, torch.bfloat16), head_dim=(8, 256),
                        softcap=True, varlen=True, arbitrary_mask=False, compile=False, backward=False)


def _with_note(fn, note: str):
    """`fn` everywhere, with the loader's note (how long verifying the kernel took) for the plan."""
    return lambda device, dtype: Resolution(fn, note=note)


def hub_backend(name: str, device: torch.device, lock=None) -> Registered:
    """The backend a Hub attention reference names, loaded for `device`."""
    ref = parse_kernel_ref(name, "attn_implementation")
    loaded = load_kernel(ref, device, lock)
    specs = loaded.attention
    symbol = ref.symbol or loaded.metadata.get("default_attention")
    if symbol is None and hasattr(loaded.module, FLASH_VARLEN):
        symbol = FLASH_VARLEN
    if symbol is None:
        raise HubKernelError(f"{name}: name the attention function ('{ref}:<symbol>'); the repo declares "
                             f"{', '.join(specs) or 'no attention functions'} and exposes no {FLASH_VARLEN}")
    fn = getattr(loaded.module, symbol, None)
    if not callable(fn):
        raise HubKernelError(f"{name}: {loaded.source} has no function {symbol!r} "
                             f"(declared: {', '.join(specs) or 'none'})")
    if symbol in specs:
        spec = specs[symbol]
        if symbol == FLASH_VARLEN:  # the flash-attn API, with capabilities the repo declares
            if spec.mask_format != "varlen":
                raise HubKernelError(f"{name}: {FLASH_VARLEN} takes packed sequences; kernelhub.json must declare "
                                     f"mask_format 'varlen', not {spec.mask_format!r}")
            fn = flash_varlen_attention(fn)
        backend = AttentionBackend(name=name, fn=fn, mask_format=spec.mask_format, capabilities=spec.capabilities,
                                   accepts_is_causal=spec.accepts_is_causal, description=f"{loaded.source}:{symbol}",
                                   resolve=_with_note(fn, loaded.note))
    elif symbol == FLASH_VARLEN:
        fn = flash_varlen_attention(fn)
        backend = AttentionBackend(name=name, fn=fn, mask_format="varlen", capabilities=flash_capabilities(device.type),
                                   description=f"{loaded.source}:{symbol} (flash-style)",
                                   resolve=_with_note(fn, loaded.note))
    else:
        raise HubKernelError(f"{name}: {symbol!r} is not declared in the repo's kernelhub.json, so its mask format "
                             f"and capabilities are unknown. Declared: {', '.join(specs) or 'none'}")
    return Registered(backend, f"{loaded.source}:{symbol}")
