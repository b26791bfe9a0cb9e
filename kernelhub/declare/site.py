"""`AttentionSite`: where a model declares one attention computation.

A model's attention module owns one site and calls it with q/k/v and the semantic
`AttentionMask`. The site declares the semantics once (causal, window, softcap, heads);
binding gives it one immutable `SiteBinding` (callable, mask format, flags), so a forward
does no registry look-up: it reads one attribute and calls a function.

>>> import torch
>>> from kernelhub.declare.attention_mask import AttentionMask
>>> site = AttentionSite(head_dim=8, num_heads=2)
>>> q = torch.randn(1, 2, 3, 8)
>>> out, weights = site(q, q, q, AttentionMask.build(batch=1, q_len=3))
>>> site.implementation, tuple(out.shape)
('eager', (1, 3, 2, 8))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from kernelhub.declare.attention_mask import AttentionMask
from kernelhub.declare.binding import site_record
from kernelhub.declare.eager import eager_attention
from kernelhub.declare.forward_only import needs_autograd, run_forward_only
from kernelhub.declare.paged import PagedMask, paged_dense


@dataclasses.dataclass(frozen=True)
class SiteBinding:
    """What one site runs, as one immutable record: swapped whole, read once per forward.

    `fn(module, q, k, v, mask, *, scaling, dropout[, softcap][, sinks][, is_causal])`; `is_causal` (with
    mask=None) is passed only when `accepts_is_causal`, `sinks` only when the site declares sinks;
    `paged_fn` serves paged-cache forwards.
    """

    name: str
    fn: object
    mask_format: str
    accepts_is_causal: bool = False
    returns_weights: bool = False
    paged_fn: object = None
    forward_only: str = ""  # non-empty: the backend has no backward here; why (declare.forward_only)


class AttentionSite(torch.nn.Module):
    """One attention computation, declared by the model, bound to a backend by kernelhub."""

    def __init__(self, *, head_dim: int, num_heads: int, num_kv_heads: int | None = None,
                 causal: bool = True, sliding_window: int | None = None, chunk_size: int | None = None,
                 softcap: float | None = None, sinks: bool = False, dropout: float = 0.0,
                 scaling: float | None = None, layer_type: str | None = None, layer_idx: int | None = None,
                 needs_weights: bool = False, reference: Callable[..., Any] = eager_attention) -> None:
        super().__init__()
        self.head_dim, self.num_heads = head_dim, num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.causal, self.sliding_window, self.chunk_size = causal, sliding_window, chunk_size
        self.softcap, self.sinks, self.dropout = softcap, sinks, dropout
        self.scaling = head_dim ** -0.5 if scaling is None else scaling
        self.layer_type = layer_type or ("sliding_attention" if sliding_window else "full_attention")
        self.layer_idx = layer_idx
        self.needs_weights = needs_weights
        self.reference = reference
        self.unbind()

    def set_binding(self, binding: "SiteBinding") -> None:
        """Point this site at a backend (called by kernelhub's binder, not by model code).

        This is the site's own record, what a call of the site outside a model forward runs; inside
        a forward of a bound model the site runs the model's published record (`declare.binding`)."""
        self._binding = binding

    def set_implementation(self, name: str, fn: Callable[..., Any], mask_format: str, accepts_is_causal: bool = False,
                           returns_weights: bool = False, paged_fn: Callable[..., Any] | None = None) -> None:
        """`set_binding` from its fields (for tests and tools that build one by hand)."""
        self.set_binding(SiteBinding(name, fn, mask_format, accepts_is_causal, returns_weights, paged_fn))

    @property
    def binding(self) -> "SiteBinding":
        """The current record: what runs here (in this forward or generate call, if one is running)."""
        return site_record(self)

    @property
    def implementation(self) -> str:
        return site_record(self).name

    @property
    def returns_weights(self) -> bool:
        return site_record(self).returns_weights

    @property
    def paged_fn(self) -> Callable[..., Any] | None:
        return site_record(self).paged_fn

    def unbind(self) -> None:
        """Return to the eager reference."""
        self.set_binding(SiteBinding("eager", self.reference, "bool", returns_weights=True,
                                     paged_fn=paged_dense(self.reference, "bool")))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | PagedMask,
                sinks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q: [B, H, Q, D], k/v: [B, H_kv, KV, D], mask: AttentionMask -> (out [B, Q, H, D], weights|None).

        With a `PagedMask`, q is one packed row [1, H, T, D] and k/v are block pools. A site declared
        with `sinks=True` takes its module's sink logits ([num_heads]) as `sinks`, and only then."""
        b = site_record(self)  # the forward's record, read once (declare.binding)
        dropout = self.dropout if self.training else 0.0
        kw = {"softcap": self.softcap} if self.softcap else {}
        if self.sinks:
            kw["sinks"] = self._check_sinks(sinks, q.shape[1])
        elif sinks is not None:
            raise ValueError("this attention site was declared without sinks but was given sinks; "
                             "declare AttentionSite(..., sinks=True) to use them")
        if b.forward_only and needs_autograd((q, k, v)):
            return run_forward_only(lambda q, k, v: self._call(b, q, k, v, mask, dropout, kw), (q, k, v),
                                    b.forward_only)
        return self._call(b, q, k, v, mask, dropout, kw)

    def _call(self, b: SiteBinding, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: AttentionMask | PagedMask, dropout: float, kw: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(mask, PagedMask):  # k/v are block pools; see backends.paged_attention
            if b.paged_fn is None:
                raise RuntimeError(f"attention backend {b.name!r} cannot read a paged KV cache; "
                                   "bind a backend with paged support (eager, sdpa, flex, flash)")
            return mask.attend(b.paged_fn, self, q, k, v, scaling=self.scaling, dropout=dropout, **kw)
        # A sink site needs the mask as a tensor (the sink is one more column of it): it takes the
        # per-forward materialised mask, not a shortcut each layer would have to build again.
        if b.accepts_is_causal and mask.shortcut is not None and not self.sinks:
            return b.fn(self, q, k, v, None, scaling=self.scaling, dropout=dropout,
                        is_causal=mask.shortcut == "causal", **kw)
        materialized = mask.materialize(b.mask_format) if b.mask_format != "none" else None
        return b.fn(self, q, k, v, materialized, scaling=self.scaling, dropout=dropout, **kw)

    @staticmethod
    def _check_sinks(sinks: torch.Tensor | None, heads: int) -> torch.Tensor:
        if sinks is None:
            raise ValueError("this attention site declares sinks=True but was called without them; "
                             "pass the module's sink logits: site(q, k, v, mask, sinks=self.sinks)")
        if tuple(sinks.shape) != (heads,):  # q's heads: local heads under tensor parallelism
            raise ValueError(f"sinks must hold one logit per query head: shape ({heads},), "
                             f"got {tuple(sinks.shape)}")
        return sinks

    def extra_repr(self) -> str:
        return (f"implementation={self.implementation!r}, heads={self.num_heads}/{self.num_kv_heads}, "
                f"head_dim={self.head_dim}, type={self.layer_type}" + (", sinks" if self.sinks else ""))
