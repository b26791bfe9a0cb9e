"""Capturing hidden states and attention weights without touching the forward code.

A model marks where its outputs come from; the first forward that asks for them installs
one forward hook per point (never before: a model that never captures has no hooks). Hooks
write into a store held in a `ContextVar`, so threads and tasks running forwards on the same
model each collect their own outputs, and a forward that does not capture finds no store
and returns at once. Nothing is kept after the call.

>>> import torch
>>> layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
>>> with capturing(layers, lambda: {"hidden_states": list(layers)}, ["hidden_states"]) as store:
...     _ = layers[1](layers[0](torch.ones(1, 2)))
>>> len(store["hidden_states"])
2
"""

from __future__ import annotations

import contextlib
import contextvars
import threading

from kernelhub.declare.errors import KernelhubError
from kernelhub.declare.site import AttentionSite

_STORE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("kernelhub_capture", default=None)
_HOOKED = "_kernelhub_capture_hooked"
_INSTALL = threading.Lock()


def _hook(kind: str, pick):
    def hook(module, args, output):
        store = _STORE.get()
        if store is not None and kind in store:
            store[kind].append(pick(output))
    return hook


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _second(output):
    return output[1]


PICK = {"hidden_states": _first, "attentions": _second}


@contextlib.contextmanager
def capturing(model, points, kinds):
    """Collect the outputs of `points()[kind]` modules for each kind in `kinds`, for this call only.

    `points` is a callable returning {"hidden_states" / "attentions": modules in forward
    order}; it is called only once, when hooks are first installed. Yields a dict of lists
    (empty when `kinds` is empty, and then nothing is installed or recorded).
    """
    kinds = [k for k in kinds if k]
    if not kinds:
        yield {}
        return
    if not getattr(model, _HOOKED, False):
        with _INSTALL:  # two threads capturing for the first time must not both install hooks
            if not getattr(model, _HOOKED, False):
                for kind, modules in points().items():
                    for module in modules:
                        module.register_forward_hook(_hook(kind, PICK[kind]))
                setattr(model, _HOOKED, True)
    store = {kind: [] for kind in kinds}
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


def require_weights(model) -> None:
    """Refuse output_attentions when an attention site of `model` is bound to a backend that
    returns no weights."""
    bad = [(path, site.implementation) for path, site in model.named_modules()
           if isinstance(site, AttentionSite) and not site.returns_weights]
    if bad:
        path, name = bad[0]
        raise KernelhubError(
            f"output_attentions=True needs attention weights, but {len(bad)} site(s) such as {path!r} are bound to "
            f"{name!r}, which cannot return them. Bind a backend that can (attn_implementation='eager'), or load "
            "with output_attentions=True so binding only picks such backends")
