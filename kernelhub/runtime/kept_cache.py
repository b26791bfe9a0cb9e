"""The KV cache a model's last compiled call left behind, reused by its next call of the same shape.

A compiled step's cache tensors are inputs at fixed addresses: CUDA-graph trees replay a graph
only while those addresses stay the same, and record it again when they move. A new cache per
call would move them every call. So a finished compiled call leaves its cache with the model
(`keep`), and the next call asks for one (`take`): it gets the kept cache, `reset()`, when that
cache was made for the same `spec`, and a new one otherwise.

- One cache per model and kind ("static" for `generate`, "paged" for `generate_batch`): the
  memory held is bounded by one cache of each.
- Held weakly with the model, so it goes with the model, and `copy.deepcopy` or `torch.save`
  never copy it.
- Calls that overlap get different caches: `take` removes the kept one, and a call of another
  shape drops it before making its own (its memory is free for the new one).

>>> class Model(torch.nn.Module): pass
>>> class Cache:
...     def reset(self): self.cleared = True
>>> model, cache = Model(), Cache()
>>> keep(model, "static", ("rows", 2), cache)
>>> take(model, "static", ("rows", 2), Cache) is cache, cache.cleared
(True, True)
>>> take(model, "static", ("rows", 2), Cache) is cache   # taken: the next call makes its own
False
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch

_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {kind: (spec, cache)}
_lock = threading.Lock()


def take(model: torch.nn.Module, kind: str, spec, make: Callable):
    """The cache `model` kept for `kind`, reset, if it was made for `spec`; else `make()`."""
    with _lock:
        kept_spec, cache = _kept.get(model, {}).pop(kind, (None, None))
    if kept_spec != spec:
        del cache  # before `make`, so the memory is free for the new one
        return make()
    cache.reset()
    return cache


def keep(model: torch.nn.Module, kind: str, spec, cache) -> None:
    """Leave `cache` (made for `spec`, read by no one any more) for `model`'s next call of `kind`."""
    with _lock:
        _kept.setdefault(model, {})[kind] = (spec, cache)


def kept(model: torch.nn.Module, kind: str):
    """The cache `model` keeps for `kind` now, or None (for tests and debugging)."""
    with _lock:
        return _kept.get(model, {}).get(kind, (None, None))[1]
