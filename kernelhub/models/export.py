"""`torch.export` of a bound model's decode step over a static KV cache.

The exported program is one graph (bound kernels included: Hub kernels are `torch.library`
ops and appear in it by name) that runs a decode step without Python: feed one token per row,
get the next-token logits, and the program writes the step's keys and values into the cache
it holds. The write position `seen` is a symbolic int input, so one program serves every
position of the cache; shapes (batch, cache length) are fixed at export.

    cache = model.make_cache("static", batch=1, max_len=64)
    model(prompt, cache=cache)                       # eager prefill fills the cache
    step = export_decode_step(model, cache).module()
    padding = torch.ones(1, 64, dtype=torch.long)    # real tokens over the whole cache
    seen = cache.get_seq_length()
    logits = step(token, torch.tensor([[seen]]), padding, seen)   # writes position `seen`

The program's buffers are the cache's own tensors, so the eager prefill and the exported steps
share one cache; the caller advances `seen` (one per step).
"""

from __future__ import annotations

import torch

from kernelhub.declare.cache import StaticCache
from kernelhub.models.compiled_decode import decode_step


class DecodeStep(torch.nn.Module):
    """`model`'s decode step over `cache`'s tensors (held as buffers, so export tracks their writes)."""

    def __init__(self, model: torch.nn.Module, cache: StaticCache):
        super().__init__()
        self.model = model
        self.layer_types, self.max_len = cache.layer_types, cache.max_len
        for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
            self.register_buffer(f"keys_{i}", k, persistent=False)
            self.register_buffer(f"values_{i}", v, persistent=False)

    def forward(self, ids, positions, padding, seen: int):
        """Logits [B, V] for `ids` [B, 1] at `positions` [B, 1], written at cache position `seen`;
        `padding` [B, cache length] marks real tokens with 1 (ones past the prompt)."""
        cache = StaticCache.__new__(StaticCache)  # a view of the buffers at position `seen`
        cache.layer_types, cache.max_len, cache.seen = self.layer_types, self.max_len, seen
        cache.keys = [getattr(self, f"keys_{i}") for i in range(len(self.layer_types))]
        cache.values = [getattr(self, f"values_{i}") for i in range(len(self.layer_types))]
        return decode_step(self.model, ids, positions, padding, cache)


def export_decode_step(model: torch.nn.Module, cache: StaticCache) -> torch.export.ExportedProgram:
    """Export `model`'s decode step over the static `cache` (see the module docstring).

    >>> import kernelhub, tempfile
    >>> from kernelhub.samples import write_random_checkpoint
    >>> path = tempfile.mkdtemp(); write_random_checkpoint(path)
    >>> model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    >>> cache = model.make_cache("static", batch=1, max_len=8)
    >>> _ = model(torch.tensor([[1, 2, 3]]), cache=cache)
    >>> step = export_decode_step(model, cache).module()
    >>> step(torch.tensor([[4]]), torch.tensor([[3]]), torch.ones(1, 8, dtype=torch.long), 3).shape
    torch.Size([1, 256])
    """
    batch = cache.keys[0].shape[0]
    seen = min(max(cache.seen, 1), cache.max_len - 2)  # an example position inside the symbolic range
    example = (torch.zeros(batch, 1, dtype=torch.long), torch.full((batch, 1), seen),
               torch.ones(batch, cache.max_len, dtype=torch.long), seen)
    with torch.no_grad():
        return torch.export.export(DecodeStep(model, cache), example,
                                   dynamic_shapes=(None, None, None, torch.export.Dim.DYNAMIC))
