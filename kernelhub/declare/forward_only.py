"""Running a forward-only backend in a model bound for inference, with autograd on.

A model loaded for inference is called like any module: parameters still require grad and
`torch.no_grad()` is not required. A backend without a backward on this device (flex on
CPU, say) then runs under `no_grad`, and its output is tied to the inputs by a node whose
backward raises a clear error naming the mode to bind with, so a gradient never silently
skips attention.

>>> import torch
>>> def double(module, q, k, v, mask, *, scaling, dropout=0.0):
...     return 2 * q, None
>>> fn = forward_only(double, "double", "cpu")
>>> q = torch.ones(1, requires_grad=True)
>>> out, _ = fn(None, q, q, q, None, scaling=1.0)
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


def forward_only(fn, name: str, device_type: str):
    """`fn` that runs without autograd when its inputs require grad, and refuses a backward."""
    why = (f"attention backend {name!r} has no backward on {device_type}: the model was bound for inference. "
           f"Bind with mode=kernelhub.Mode.TRAINING (or mode='training') to get a backend that can train")

    def attention(module, q, k, v, mask, **kwargs):
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            return fn(module, q, k, v, mask, **kwargs)
        with torch.no_grad():
            out, weights = fn(module, q.detach(), k.detach(), v.detach(), mask, **kwargs)
        anchor = next(t for t in (q, k, v) if t.requires_grad)
        return _NoBackward.apply(out, anchor, why), weights

    attention.__wrapped__ = fn
    return attention
