"""KV caches. They own positions: `get_seq_length` and `get_mask_sizes` replace cache_position.

- `DynamicCache` grows by concatenation; sliding layers keep only the last `window - 1`
  keys between steps, so memory stays bounded.
- `StaticCache` preallocates [B, H_kv, max_len, D] per layer and writes in place with
  `index_copy_`, so a decode step has fixed shapes and works under
  `torch.compile(fullgraph=True)`. Its sliding layers keep the full length and rely on
  the sliding mask (simple and correct, not memory-optimal).
- `StaticCacheStep` is a static cache as one compiled, captured or exported step sees it:
  the same tensors, and a write position held in a device tensor instead of a Python int,
  so one graph (and one CUDA graph) serves every position.

Which layers slide comes from the model config's `layer_types`.

>>> import torch
>>> cache = DynamicCache(["full_attention", "sliding_attention"], sliding_window=2)
>>> k = torch.zeros(1, 1, 5, 4)
>>> cache.get_mask_sizes(5, 1)
(5, 0)
>>> _ = cache.update(k, k, 0); _ = cache.update(k, k, 1)
>>> cache.get_seq_length(), cache.get_mask_sizes(1, 0), cache.get_mask_sizes(1, 1)
(5, (6, 0), (2, 4))
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class DynamicCache:
    """A cache that grows with each step; sliding layers drop keys outside the window."""

    def __init__(self, layer_types: Iterable[str], sliding_window: int | None = None) -> None:
        self.layer_types = list(layer_types)
        if "sliding_attention" in self.layer_types and not sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        self.sliding_window = sliding_window
        self.keys: list[torch.Tensor | None] = [None] * len(self.layer_types)
        self.values: list[torch.Tensor | None] = [None] * len(self.layer_types)
        self.seen = [0] * len(self.layer_types)

    def _keep(self, layer_idx: int) -> int | None:
        """How many keys a layer keeps between steps (None = all)."""
        return self.sliding_window - 1 if self.layer_types[layer_idx] == "sliding_attention" else None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens this layer has seen so far (its next query's absolute position)."""
        return self.seen[layer_idx]

    def get_mask_sizes(self, q_len: int, layer_idx: int) -> tuple[int, int]:
        """(kv_len, kv_offset) of the keys the next `q_len` queries will attend over."""
        seen, keep = self.seen[layer_idx], self._keep(layer_idx)
        held = seen if keep is None else min(seen, keep)
        return held + q_len, seen - held

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v ([B, H_kv, S, D]) and return the keys/values to attend over."""
        self.seen[layer_idx] += k.shape[-2]
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=-2)
            v = torch.cat([self.values[layer_idx], v], dim=-2)
        keep = self._keep(layer_idx)
        self.keys[layer_idx] = k if keep is None else k[:, :, max(0, k.shape[-2] - keep):]
        self.values[layer_idx] = v if keep is None else v[:, :, max(0, v.shape[-2] - keep):]
        return k, v


class StaticCache:
    """A preallocated cache of `max_len` positions per layer, written in place."""

    def __init__(self, layer_types: Iterable[str], *, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.layer_types = list(layer_types)
        self.max_len = max_len
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layer_types]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layer_types]
        # Where a compiled step writes: `seen` on the device, refreshed before each step by a kernel
        # launch (`fill_`), not a blocking copy from the host.
        self.position = torch.zeros((), dtype=torch.long, device=device)
        for t in self.keys + self.values + [self.position]:
            # A captured step writes these in place (or reads them without copying them in); CUDA graphs
            # allow that only for inputs whose address never changes. Unguarded: a new cache's tensors
            # are recorded again, not recompiled.
            torch._dynamo.mark_static_address(t, guard=False)
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens written so far (the same for every layer)."""
        return self.seen

    def reset(self) -> None:
        """Empty the cache for reuse: position 0, every buffer zeroed (a stale NaN in a masked slot
        would still reach attention's weighted sum as 0 x NaN)."""
        with torch.inference_mode():  # the buffers may have been made in it (generate is)
            for t in self.keys + self.values:
                t.zero_()
        self.seen = 0

    def step_view(self, q_len: int) -> StaticCacheStep:
        """The view a compiled step writes the next `q_len` positions through. Once the step has run,
        the caller counts them: `cache.seen += q_len`.

        >>> cache = StaticCache(["full_attention"], batch=1, max_len=4, num_kv_heads=1, head_dim=2)
        >>> step = cache.step_view(1)
        >>> step.get_seq_length(), cache.get_seq_length()
        (tensor(0), 0)
        """
        self._check_room(q_len)
        self.position.fill_(self.seen)
        return StaticCacheStep(self.layer_types, self.keys, self.values, self.position)

    def _check_room(self, q_len: int) -> None:
        if self.seen + q_len > self.max_len:
            raise ValueError(f"StaticCache holds {self.max_len} positions; cannot add {q_len} after {self.seen}")

    def get_mask_sizes(self, q_len: int, layer_idx: int) -> tuple[int, int]:
        """Always the whole buffer; the causal mask hides positions not yet written."""
        return self.max_len, 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v at the current position; the last layer advances the position."""
        q_len = k.shape[-2]
        self._check_room(q_len)
        index = torch.arange(self.seen, self.seen + q_len, device=k.device)
        self.keys[layer_idx].index_copy_(2, index, k.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, index, v.to(self.values[layer_idx].dtype))
        if layer_idx == len(self.layer_types) - 1:
            self.seen += q_len
        return self.keys[layer_idx], self.values[layer_idx]


class StaticCacheStep:
    """A static cache's tensors written at `position`, a 0-d long device tensor: what one compiled,
    captured or exported step sees (`StaticCache.step_view` makes one).

    Nothing in it is a Python number that moves per token, so the compiler has nothing to
    specialise on or guard, and a CUDA graph captured at one position replays at every other
    (it reads the position tensor, which the cache refreshes between replays). Bounds are the
    caller's to check: a graph cannot raise on a value it never reads on the host.
    """

    def __init__(self, layer_types: list[str], keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                 position: torch.Tensor) -> None:
        self.layer_types, self.keys, self.values, self.position = layer_types, keys, values, position
        self.max_len = keys[0].shape[2]

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        """The write position, as the 0-d device tensor (masks offset their queries by it)."""
        return self.position

    def get_mask_sizes(self, q_len: int, layer_idx: int) -> tuple[int, int]:
        """Always the whole buffer, as for `StaticCache`."""
        return self.max_len, 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ([B, H_kv, S, D]) at `position`; return the layer's whole buffers."""
        index = self.position + torch.arange(k.shape[-2], device=k.device)
        self.keys[layer_idx].index_copy_(2, index, k.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, index, v.to(self.values[layer_idx].dtype))
        return self.keys[layer_idx], self.values[layer_idx]
