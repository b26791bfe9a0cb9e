"""Conformance: a kernel is checked against the reference it replaces before it is applied.

A layer kernel runs once on its layer's probe (`probe(like, dtype, device)` on the declared
class: a small seeded instance and inputs, see `kernelhub.declare.reference_layers`) in the
bound dtype and on the bound device, next to the declared class's own forward. Its error is
`max|kernel - reference| / max|reference|`; above the class's `tolerance` for the dtype the
kernel is rejected with the measured numbers. An attention backend from the Hub is probed the
same way against eager attention on a small padded causal case.

Verdicts are cached per (kernel forward, declared class, the instance's variant, dtype, device),
so a warm bind costs a dictionary look-up. A layer class without a `probe` (a user's own layer)
is not verified, and the plan says so.

>>> import torch
>>> from kernelhub.declare.reference_layers import RMSNorm
>>> class Doubled(torch.nn.Module):
...     def forward(self, x):
...         return 2 * RMSNorm.forward(self, x)
>>> verdict = check_layer(Doubled.forward, RMSNorm(8), torch.float32, torch.device("cpu"))
>>> verdict.ok, round(verdict.error, 3)
(False, 1.0)
"""

from __future__ import annotations

import dataclasses
import inspect
import threading

import torch

from kernelhub.declare.probe import TOLERANCE, randn

_cache: dict = {}
_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The measured error of a kernel on its probe (None: not probed) and the tolerance it met or not."""

    error: float | None
    tolerance: float | None
    against: str = ""
    problem: str = ""  # the probe itself failed (raised, wrong shape)

    @property
    def ok(self) -> bool:
        return not self.problem and (self.error is None or self.error <= self.tolerance)

    def reason(self) -> str:
        """Why the kernel is rejected, for the plan and the error."""
        if self.problem:
            return f"failed its conformance probe against {self.against}: {self.problem}"
        return (f"conformance: max error {self.error:.3g} exceeds the tolerance {self.tolerance:g} "
                f"against {self.against}")

    def note(self) -> str:
        """What the plan shows for a kernel that passed."""
        if self.error is None:
            return f"not verified: {self.against} declares no conformance probe"
        return f"max err {self.error:.2g} (tol {self.tolerance:g})"


def relative_error(out, ref) -> float:
    """max|out - ref| / max|ref| over a tensor or a tuple of tensors (shapes must match)."""
    outs, refs = (out, ref) if isinstance(ref, (tuple, list)) else ((out,), (ref,))
    if not isinstance(outs, (tuple, list)) or len(outs) != len(refs):
        raise ValueError(f"returned {type(out).__name__}, the reference returns {len(refs)} tensor(s)")
    worst = 0.0
    for o, r in zip(outs, refs):
        if not isinstance(o, torch.Tensor) or o.shape != r.shape:
            raise ValueError(f"returned shape {tuple(getattr(o, 'shape', ()))}, the reference {tuple(r.shape)}")
        diff = (o.double() - r.double()).abs().max().item()
        scale = max(r.double().abs().max().item(), torch.finfo(r.dtype).tiny if r.is_floating_point() else 1.0)
        worst = max(worst, diff / scale if diff == diff else float("inf"))  # NaN counts as infinitely wrong
    return worst


def _variant(module) -> tuple:
    needs = getattr(module, "kernel_requirements", None)
    probed = getattr(module, "probe_variant", None)  # what else the probe copies from the instance
    return (tuple(needs()) if needs is not None else ()) + (tuple(probed()) if probed is not None else ())


def _cached(key, measure) -> Verdict:
    with _lock:
        found = _cache.get(key)
    if found is None:
        found = measure()
        with _lock:
            _cache[key] = found
    return found


def check_layer(forward, module, dtype, device) -> Verdict:
    """The verdict on `forward` (a kernel's forward, taking the host module as self) for `module`'s layer."""
    declared = type(module)
    probe = getattr(declared, "probe", None)
    name = f"{declared.__name__}'s reference"
    if probe is None:
        return Verdict(None, None, declared.__name__)

    def measure() -> Verdict:
        tolerance = declared.tolerance.get(dtype, TOLERANCE[torch.float32])
        try:
            host, args = probe(module, dtype, device)
            with torch.no_grad():
                reference = declared.forward(host, *args)
                out = forward(host, *args)
            return Verdict(relative_error(out, reference), tolerance, f"{name} ({_dtype(dtype)})")
        except Exception as e:  # noqa: BLE001 - any failure of a foreign kernel on the probe is a rejection
            return Verdict(None, tolerance, f"{name} ({_dtype(dtype)})", f"{type(e).__name__}: {e}")

    return _cached((forward, declared, _variant(module), dtype, torch.device(device).type), measure)


def check_attention(record, reference_record, dtype, device) -> Verdict:
    """The verdict on an attention `record` (a `SiteBinding`) against eager on a padded causal probe."""
    from kernelhub.declare.attention_mask import AttentionMask
    from kernelhub.declare.site import AttentionSite

    def measure() -> Verdict:
        tolerance = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
        against = f"eager attention ({_dtype(dtype)})"
        site = AttentionSite(head_dim=16, num_heads=4, num_kv_heads=2).to(device)
        q = randn(2, 4, 6, 16, dtype=dtype, device=device)
        k = randn(2, 2, 6, 16, dtype=dtype, device=device, seed=1)
        v = randn(2, 2, 6, 16, dtype=dtype, device=device, seed=2)
        padding = torch.ones(2, 6, dtype=torch.bool, device=device)
        padding[1, :2] = False  # a left-padded row: the mask is not the plain causal triangle
        mask = AttentionMask.build(batch=2, q_len=6, padding=padding, device=device)
        try:
            with torch.no_grad():
                site.set_binding(reference_record)
                ref, _ = site(q, k, v, mask)
                site.set_binding(record)
                out, _ = site(q, k, v, mask)
            rows = padding[:, :, None, None].expand_as(ref)  # padded query rows are undefined
            return Verdict(relative_error(out[rows], ref[rows]), tolerance, against)
        except Exception as e:  # noqa: BLE001 - any failure of a foreign kernel on the probe is a rejection
            return Verdict(None, tolerance, against, f"{type(e).__name__}: {e}")

    # keyed by the kernel's own function: wrappers (forward-only, flash-style) are made anew per bind
    return _cached((inspect.unwrap(record.fn), record.mask_format, dtype, torch.device(device).type), measure)


def _dtype(dtype) -> str:
    return str(dtype).removeprefix("torch.")
