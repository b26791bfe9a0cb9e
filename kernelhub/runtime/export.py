"""`torch.export` of a bound model's decode step over a static KV cache.

The exported program is one graph (bound kernels included: Hub kernels are `torch.library`
ops and appear in it by name) that runs a decode step without Python: feed one token per row,
get the next-token logits, and the program writes the step's keys and values into the cache
it holds. The write position is an input, a 0-d long tensor (the cache seen through a
`StaticCacheStep`, as in a compiled step), so one program serves every position of the cache;
shapes (batch, cache length) are fixed at export.

    cache = model.make_cache("static", batch=1, max_len=64)
    model(prompt, cache=cache)                       # eager prefill fills the cache
    step = export_decode_step(model, cache).module()
    padding = torch.ones(1, 64, dtype=torch.long)    # real tokens over the whole cache
    seen = cache.get_seq_length()
    logits = step(token, torch.tensor([[seen]]), padding, torch.tensor(seen))   # writes position `seen`

The program's buffers are the cache's own tensors, so the eager prefill and the exported steps
share one cache; the caller keeps the position (one more per step).
"""

from __future__ import annotations

import torch

from kernelhub.declare.cache import StaticCache, StaticCacheStep
from kernelhub.runtime.compiled_decode import decode_step


class DecodeStep(torch.nn.Module):
    """`model`'s decode step over `cache`'s tensors (held as buffers, so export tracks their writes)."""

    def __init__(self, model: torch.nn.Module, cache: StaticCache):
        super().__init__()
        self.model = model
        self.layer_types = cache.layer_types
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            self.register_buffer(f"keys_{i}", k, persistent=False)
            self.register_buffer(f"values_{i}", v, persistent=False)

    def forward(self, ids, positions, padding, seen: torch.Tensor):
        """Logits [B, V] for `ids` [B, 1] at `positions` [B, 1], written at cache position `seen` (a 0-d
        long tensor); `padding` [B, cache length] marks real tokens with 1 (ones past the prompt)."""
        n = len(self.layer_types)
        cache = StaticCacheStep(self.layer_types, [getattr(self, f"keys_{i}") for i in range(n)],
                                [getattr(self, f"values_{i}") for i in range(n)], seen)
        return decode_step(self.model, ids, positions, padding, cache)


def export_decode_step(model: torch.nn.Module, cache: StaticCache) -> torch.export.ExportedProgram:
    """Export `model`'s decode step over the static `cache` (see the module docstring).

    >>> import kernelhub, tempfile
    >>> from kernelhub.testing.samples import write_random_checkpoint
    >>> path = tempfile.mkdtemp(); write_random_checkpoint(path)
    >>> model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    >>> cache = model.make_cache("static", batch=1, max_len=8)
    >>> _ = model(torch.tensor([[1, 2, 3]]), cache=cache)
    >>> step = export_decode_step(model, cache).module()
    >>> step(torch.tensor([[4]]), torch.tensor([[3]]), torch.ones(1, 8, dtype=torch.long), torch.tensor(3)).shape
    torch.Size([1, 256])
    """
    batch, seen = cache.keys[0].shape[0], min(cache.seen, cache.max_len - 1)
    example = (torch.zeros(batch, 1, dtype=torch.long), torch.full((batch, 1), seen),
               torch.ones(batch, cache.max_len, dtype=torch.long), torch.tensor(seen))
    with torch.no_grad():
        return torch.export.export(DecodeStep(model, cache), example)
