"""What a kernel can do, as data, and the check that turns an attention site into reasons.

`Capabilities` is the one capabilities record of every kernel: attention backends and layer
kernels (in-process, local, Hub) alike, one field per concept (`devices`, `dtypes`, `backward`,
`compile`, ...). It is plain data so that docs tables and `kernelhub backends` are generated
from it. `unsupported()` is the only place that compares an attention site's needs with a
backend's capabilities (`layer_contract.layer_reasons` does it for layers); both return human
reasons, never a bare bool.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
from collections.abc import Callable, Iterable

import torch
from packaging.requirements import InvalidRequirement, Requirement

from kernelhub.backends.paged_attention import paged_adapter
from kernelhub.backends.resolution import Resolution
from kernelhub.declare.site import AttentionSite
from kernelhub.registry.modes import Mode, ModeLike, parse_mode

MASK_FORMATS = ("additive", "bool", "block_mask", "varlen", "none")
_ALL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What an attention site may need; a layer kernel serves no attention site, so it has none of them.
SITE_FEATURES = ("gqa", "sliding_window", "softcap", "sinks", "dropout", "returns_weights", "varlen", "paged",
                 "arbitrary_mask")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a kernel supports. Defaults describe a conservative dense attention backend;
    `Capabilities.for_layer` gives a layer kernel's defaults (any device and dtype).

    `devices`/`dtypes` None: any. `head_dim` .. `arbitrary_mask`: the attention-site features.
    `supports`: optional features a declared layer may need (e.g. "bias"). `unsupported(device,
    dtype) -> [reasons]`: what data cannot say (the CPU lacks an instruction set, say).

    >>> Capabilities(devices=("cpu", "cuda"), returns_weights=True).returns_weights
    True
    >>> Capabilities.for_layer(supports=("bias",), compile=False).features()
    ['bias', 'backward']
    """

    devices: tuple[str, ...] | None = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] | None = _ALL_DTYPES
    head_dim: tuple[int, int] = (1, 512)
    gqa: bool = True
    sliding_window: bool = True
    softcap: bool = False
    sinks: bool = False
    dropout: bool = False
    returns_weights: bool = False
    varlen: bool = False
    paged: bool = False
    arbitrary_mask: bool = True
    compile: bool = True
    # True, False, or the device types where a backward pass exists (e.g. ("cuda",)).
    backward: bool | tuple[str, ...] = True
    # Device type -> fields that differ there, e.g. {"cuda": {"head_dim": (16, 256)}}.
    per_device: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
    # Optional features a kernel implements, checked against what a declared layer instance needs.
    supports: tuple[str, ...] = ()
    # In-process kernels only: `unsupported(device, dtype) -> [reasons]`; the docs keep showing the declared dtypes.
    unsupported: Callable[[torch.device, torch.dtype], list[str]] | None = dataclasses.field(default=None,
                                                                                             compare=False)

    @classmethod
    def for_layer(cls, *, devices: tuple[str, ...] | None = None, dtypes: tuple[torch.dtype, ...] | None = None,
                  backward: bool | tuple[str, ...] = True, compile: bool = True, supports: tuple[str, ...] = (),
                  unsupported: Callable[[torch.device, torch.dtype], list[str]] | None = None) -> Capabilities:
        """A layer kernel's capabilities: any device and dtype unless given, no attention-site features."""
        return cls(devices=devices, dtypes=dtypes, backward=backward, compile=compile, supports=supports,
                   unsupported=unsupported, **dict.fromkeys(SITE_FEATURES, False))

    def __post_init__(self) -> None:
        fields = {f.name for f in dataclasses.fields(self)} - {"per_device"}
        for device, overrides in self.per_device.items():
            unknown = set(overrides) - fields
            if unknown:
                raise ValueError(f"Capabilities.per_device[{device!r}] sets unknown fields {sorted(unknown)}; "
                                 f"valid: {', '.join(sorted(fields))}")

    def on(self, device_type: str) -> Capabilities:
        """The capabilities that hold on `device_type` (per-device overrides applied).

        >>> caps = Capabilities(head_dim=(1, 512), per_device={"cuda": {"head_dim": (16, 256)}})
        >>> caps.on("cuda").head_dim, caps.on("cpu").head_dim
        ((16, 256), (1, 512))
        """
        overrides = self.per_device.get(device_type)
        return dataclasses.replace(self, per_device={}, **overrides) if overrides else self

    def features(self) -> list[str]:
        """What tables show: optional features, attention-site features, then backward and compile."""
        return [*self.supports, *(f for f in SITE_FEATURES if getattr(self, f)),
                *(["backward"] if self.backward else []), *(["compile"] if self.compile else [])]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """An attention implementation: data plus one function.

    `fn(module, q, k, v, mask, *, scaling, dropout=0.0, **kw) -> (out[B,S,H,D], weights|None)`
    with q/k/v shaped [B, H, S, D]. `mask` arrives in `mask_format`.

    >>> from kernelhub.declare.eager import eager_attention
    >>> b = AttentionBackend(name="mine", fn=eager_attention, mask_format="additive")
    >>> b.name
    'mine'
    """

    name: str
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    mask_format: str | None = None
    aliases: tuple[str, ...] = ()
    capabilities: Capabilities = Capabilities()
    requires: tuple[str, ...] = ()
    description: str = ""
    # Opt-in: receive mask=None plus is_causal when the mask is the plain causal triangle
    # or masks nothing, instead of a materialised tensor.
    accepts_is_causal: bool = False
    # Optional `resolve(device, dtype) -> Resolution`, for backends whose implementation depends
    # on the machine (flash: flash-attn on CUDA, a Triton kernel elsewhere). None: `fn` everywhere.
    resolve: Callable[[torch.device, torch.dtype | None], Resolution] | None = None

    def resolution(self, device: torch.device | str, dtype: torch.dtype) -> Resolution:
        """The functions serving this backend on `device`/`dtype`, with paged support composed
        from `fn` and `mask_format` unless the backend reads block tables itself."""
        res = self.resolve(torch.device(device), dtype) if self.resolve else Resolution(self.fn)
        if res.problems or res.paged_fn is not None or not self.capabilities.paged:
            return res
        return dataclasses.replace(res, paged_fn=paged_adapter(res.fn, self.mask_format))


def unsupported(backend: AttentionBackend, site: AttentionSite, device: torch.device | str, dtype: torch.dtype,
                mode: ModeLike = "inference") -> list[str]:
    """Every reason `backend` cannot serve `site` on `device`/`dtype` in `mode`; [] if it can.

    >>> from kernelhub.declare.site import AttentionSite
    >>> from kernelhub.registry.builtins import SDPA
    >>> unsupported(SDPA, AttentionSite(head_dim=64, num_heads=4), "cpu", torch.float32)
    []
    """
    mode = parse_mode(mode)
    device_type = torch.device(device).type
    caps = backend.capabilities.on(device_type)
    reasons = machine_problems(backend, device_type)
    if backend.resolve and not reasons:  # problems that depend on the dtype
        reasons += backend.resolve(torch.device(device), dtype).problems
    if caps.unsupported is not None and not reasons:  # what data cannot say
        reasons += caps.unsupported(torch.device(device), dtype)
    if caps.dtypes is not None and dtype not in caps.dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in caps.dtypes)
        reasons.append(f"supports dtypes {names}, not {str(dtype).removeprefix('torch.')}")
    lo, hi = caps.head_dim
    if not lo <= site.head_dim <= hi:
        reasons.append(f"supports head_dim {lo}..{hi}, not {site.head_dim}")
    if site.num_kv_heads != site.num_heads and not caps.gqa:
        reasons.append(f"no grouped-query attention ({site.num_heads} query heads, {site.num_kv_heads} kv heads)")
    if site.sliding_window and not caps.sliding_window:
        reasons.append(f"no sliding window (site uses window {site.sliding_window})")
    if site.chunk_size and not caps.arbitrary_mask:
        reasons.append(f"no chunked attention (site uses chunks of {site.chunk_size}; needs an arbitrary mask)")
    if site.softcap and not caps.softcap:
        reasons.append(f"no logit softcap (site uses softcap {site.softcap})")
    if site.sinks:
        reasons += sink_problems(backend, caps, site, device, dtype, mode)
    if site.needs_weights and not caps.returns_weights:
        reasons.append("cannot return attention weights (output_attentions=True); eager can")
    if mode.training:
        if not on_device(caps.backward, device_type):
            elsewhere = backward_devices(backend.capabilities)
            where = f" on {device_type} (backward on {', '.join(elsewhere)})" if elsewhere else ""
            reasons.append(f"forward-only{where}, no backward for training")
        if site.dropout and not caps.dropout:
            reasons.append(f"no attention dropout in training (site dropout {site.dropout})")
    if mode.compile and not caps.compile:
        reasons.append("cannot run under torch.compile")
    return reasons


def sink_problems(backend: AttentionBackend, caps: Capabilities, site: AttentionSite, device: torch.device | str,
                  dtype: torch.dtype, mode: Mode) -> list[str]:
    """Why `backend` cannot give `site` its attention sinks here ([] if it can)."""
    where = f"layer {site.layer_idx} ({site.layer_type})" if site.layer_idx is not None else site.layer_type
    needs = f"the {where} attention site has learned sinks"
    res = backend.resolve(torch.device(device), dtype) if backend.resolve else None
    why = res and (res.no_sinks or (mode.compile and res.no_sinks_compiled))
    if why:  # the implementation chosen for this device says why, in its own words
        return [f"no attention sinks here: {why} ({needs})"]
    return [] if caps.sinks else [f"no attention sinks ({needs})"]


def machine_problems(backend: AttentionBackend, device_type: str) -> list[str]:
    """Reasons `backend` cannot run on this machine's `device_type` at all, whatever the model."""
    reasons = requirement_problems(backend.requires)
    devices = backend.capabilities.on(device_type).devices
    if devices is not None and device_type not in devices:
        reasons.append(f"runs on {', '.join(backend.capabilities.devices or devices)}, not {device_type}")
    elif backend.resolve is not None:
        reasons += backend.resolve(torch.device(device_type), None).problems
    return reasons


def backward_devices(caps: Capabilities) -> tuple[str, ...]:
    """The device types where a backend has a backward pass (among those it names, when it runs anywhere)."""
    named = caps.devices if caps.devices is not None else \
        (*(caps.backward if isinstance(caps.backward, tuple) else ()), *caps.per_device)
    return tuple(d for d in dict.fromkeys(named) if on_device(caps.on(d).backward, d))


def on_device(flag: bool | tuple[str, ...], device_type: str) -> bool:
    """A capability that is a bool, or a tuple of the device types that have it."""
    return device_type in flag if isinstance(flag, tuple) else bool(flag)


def requirement_problems(requires: Iterable[str]) -> list[str]:
    """Reasons why requirement strings like 'torch>=2.5' are not met in this environment."""
    return list(_requirement_problems(tuple(requires)))


@functools.lru_cache(maxsize=256)
def _requirement_problems(requires: tuple) -> tuple:
    # Reading package metadata costs ~3 ms; a bind checks every site, so remember the answer.
    problems = []
    for text in requires:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            problems.append(f"has an unparsable requirement {text!r}")
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"needs {text}, which is not installed")
            continue
        if req.specifier and not req.specifier.contains(have.split("+")[0], prereleases=True):
            problems.append(f"needs {text}, found {req.name} {have}")
    return tuple(problems)
