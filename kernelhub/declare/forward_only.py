"""Running a forward-only backend in a model bound for inference, with autograd on.

A model loaded for inference is called like any module: parameters still require grad and
`torch.no_grad()` is not required. A backend without a backward on this device (flex on
CPU, say) is bound with `SiteBinding.forward_only` set to the reason; the site then runs it
under `no_grad` and ties its output to the inputs by a node whose backward raises that reason,
so a gradient never silently skips attention. A flag on the record, not a wrapper around the
backend: the plan, the record and the function called are the backend's own.

>>> import torch
>>> q = torch.ones(1, requires_grad=True)
>>> out, _ = run_forward_only(lambda q, k, v: (2 * q, None), (q, q, q), "no backward here")
>>> out.requires_grad, out.tolist()
(True, [2.0])
"""

from __future__ import annotations

import torch

from kernelhub.declare.errors import BindError


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, anchor, why):
        ctx.why = why
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        raise BindError(ctx.why)


def needs_autograd(tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def run_forward_only(call, qkv, why: str):
    """`call(q, k, v) -> (out, weights)` without autograd; `out` is tied to the inputs by a node whose
    backward raises `why`. Only for inputs that need autograd (`needs_autograd`)."""
    with torch.no_grad():
        out, weights = call(*(t.detach() for t in qkv))
    anchor = next(t for t in qkv if t.requires_grad)
    return _NoBackward.apply(out, anchor, why), weights


def no_backward_reason(name: str, device_type: str) -> str:
    """What a backward through a forward-only backend raises."""
    return (f"attention backend {name!r} has no backward on {device_type}: the model was bound for inference. "
            f"Bind with mode=kernelhub.Mode.TRAINING (or mode='training') to get a backend that can train")
