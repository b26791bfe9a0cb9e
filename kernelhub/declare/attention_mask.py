"""The semantic attention mask a model builds once per forward.

`AttentionMask` says *what* may attend to what (a `mask_mod` over absolute positions plus
query/key lengths and offsets). Each bound backend asks for the format it declared
(`bool`, `additive`, `block_mask`); each format is built once and memoised, so 32 layers
share one tensor. No `cache_position` anywhere: offsets come from the KV cache.

>>> m = AttentionMask.build(batch=1, q_len=3, kv_len=3, causal=True)
>>> print(m.to_ascii())
x..
xx.
xxx
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernelhub.declare import masks as M
from kernelhub.declare.masks import MaskMod

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from kernelhub.declare.varlen import VarlenMask


class AttentionMask:
    """Which key positions each query position may see, for one forward."""

    def __init__(self, mask_mod: MaskMod, *, batch: int, q_len: int, kv_len: int, q_offset: int | torch.Tensor = 0,
                 kv_offset: int = 0, device: torch.device | str = "cpu", batch_dependent: bool = False,
                 shortcut: str | None = None, description: str = "") -> None:
        self.mask_mod = mask_mod
        self.batch, self.q_len, self.kv_len = batch, q_len, kv_len
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.device = torch.device(device)
        self.batch_dependent = batch_dependent
        # "causal": the square lower triangle; "all": nothing masked; None: neither.
        self.shortcut = shortcut
        self.description = description
        # The structured pieces behind mask_mod (set by `build`); None for a hand-made mask_mod.
        # Packed (varlen) kernels need them: they take lengths, not a mask.
        self.parts: dict | None = None
        self._memo: dict = {}

    @classmethod
    def build(cls, *, batch: int, q_len: int, kv_len: int | None = None, q_offset: int | torch.Tensor = 0,
              kv_offset: int = 0, causal: bool = True, sliding_window: int | None = None,
              chunk_size: int | None = None, padding: torch.Tensor | None = None, mask_mod: MaskMod | None = None,
              device: torch.device | str = "cpu") -> AttentionMask:
        """Compose the usual pieces into one mask.

        `padding` is a [batch, positions] tensor (1/True = real token) over absolute key
        positions; it is extended with True up to `kv_offset + kv_len` (static caches).
        `mask_mod` adds an arbitrary extra restriction. `q_offset` may be a 0-d device tensor
        (a compiled step's cache position, `StaticCacheStep`); the mask then takes no shortcut.

        >>> AttentionMask.build(batch=2, q_len=4, sliding_window=2).description
        'causal & sliding(2)'
        """
        kv_len = q_len if kv_len is None else kv_len
        parts, names = [M.causal_mask if causal else M.bidirectional_mask], ["causal" if causal else "bidirectional"]
        if sliding_window is not None:
            parts.append(M.sliding_window_mask(sliding_window))
            names.append(f"sliding({sliding_window})")
        if chunk_size is not None:
            parts.append(M.chunked_mask(chunk_size))
            names.append(f"chunked({chunk_size})")
        if padding is not None:
            padding = _extend_padding(padding, kv_offset + kv_len, device)
            if padding is not None:
                parts.append(M.padding_mask(padding))
                names.append("padding")
        if mask_mod is not None:
            parts.append(mask_mod)
            names.append(getattr(mask_mod, "__name__", "custom"))
        plain = len(parts) == 1
        host = not isinstance(q_offset, torch.Tensor)  # a compiled step's offset lives on the device
        shortcut = None
        if plain and not causal:
            shortcut = "all"
        elif plain and host and kv_offset + kv_len <= q_offset + 1:
            shortcut = "all"  # decode: every cached key is in the past
        elif plain and host and q_offset == kv_offset and q_len == kv_len:
            shortcut = "causal"
        mod = parts[0] if plain else M.and_masks(*parts)
        mask = cls(mod, batch=batch, q_len=q_len, kv_len=kv_len, q_offset=q_offset,
                   kv_offset=kv_offset, device=device, batch_dependent=padding is not None,
                   shortcut=shortcut, description=" & ".join(names))
        mask.parts = {"causal": causal, "sliding_window": sliding_window, "chunk_size": chunk_size,
                      "padding": padding, "custom": mask_mod is not None}
        return mask

    # -- materialisers ---------------------------------------------------------------

    def materialize(self, fmt: str) -> torch.Tensor | BlockMask | VarlenMask:
        """The mask in `fmt` ("bool", "additive", "block_mask", "varlen"), built once per forward."""
        out = self._memo.get(fmt)
        if out is None:
            try:
                build = _BUILDERS[fmt]
            except KeyError:
                raise ValueError(f"unknown mask format {fmt!r}; valid: {', '.join(sorted(_BUILDERS))}") from None
            out = self._memo[fmt] = build(self)
        return out

    def to_bool(self) -> torch.Tensor:
        """[B or 1, 1, q_len, kv_len] bool tensor, True where attention is allowed."""
        dev = self.device
        b = torch.arange(self.batch if self.batch_dependent else 1, device=dev).view(-1, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=dev)
        q = torch.arange(self.q_len, device=dev).view(1, 1, -1, 1) + self.q_offset
        kv = torch.arange(self.kv_len, device=dev).view(1, 1, 1, -1) + self.kv_offset
        out = self.mask_mod(b, h, q, kv)
        return out.expand(b.shape[0], 1, self.q_len, self.kv_len)

    def to_additive(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """0 where allowed, -inf where masked; same shape as `to_bool()`."""
        allowed = self.materialize("bool")
        return torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, float("-inf"))

    def to_block_mask(self) -> BlockMask:
        """A flex attention BlockMask over relative indices (offsets folded into the mask)."""
        from torch.nn.attention.flex_attention import create_block_mask

        mod, qo, ko = self.mask_mod, self.q_offset, self.kv_offset

        def shifted(b, h, q_idx, kv_idx):
            return mod(b, h, q_idx + qo, kv_idx + ko)

        batch = self.batch if self.batch_dependent else None
        if self.q_len <= FLEX_BLOCK and not (self.parts and (self.parts["sliding_window"] or self.parts["chunk_size"])):
            return _every_block(shifted, self.q_len, self.kv_len, self.device)
        return create_block_mask(shifted, batch, None, self.q_len, self.kv_len, device=self.device)

    def to_varlen(self) -> VarlenMask:
        """Packed-sequence form (`cu_seqlens`, gather indices) for flash-style kernels."""
        from kernelhub.declare.varlen import varlen_from_mask
        return varlen_from_mask(self)

    def to_ascii(self, batch_idx: int = 0) -> str:
        """Draw the mask for one batch row: 'x' allowed, '.' masked."""
        grid = self.materialize("bool")[min(batch_idx, self.materialize("bool").shape[0] - 1), 0]
        return "\n".join("".join("x" if v else "." for v in row) for row in grid.tolist())

    def __repr__(self) -> str:
        return (f"AttentionMask({self.description}, batch={self.batch}, q={self.q_offset}+{self.q_len}, "
                f"kv={self.kv_offset}+{self.kv_len})")


_BUILDERS = {
    "bool": AttentionMask.to_bool,
    "additive": AttentionMask.to_additive,
    "block_mask": AttentionMask.to_block_mask,
    "varlen": AttentionMask.to_varlen,
}


FLEX_BLOCK = 128  # flex attention's default block size


def _every_block(mask_mod, q_len, kv_len, device):
    """A BlockMask that visits every key block and applies `mask_mod` in each: exact for any mask.

    For one block of queries (decode steps, short chunks) block sparsity skips little, but
    `create_block_mask` evaluates the mask over the whole grid, several ms per forward on a CPU
    (more than the attention itself). This one costs microseconds; the reverse (query-block)
    index, needed only for a backward pass, is built only when autograd is on."""
    from torch.nn.attention.flex_attention import BlockMask

    q_blocks, kv_blocks = -(-q_len // FLEX_BLOCK), -(-kv_len // FLEX_BLOCK)
    counts = torch.full((1, 1, q_blocks), kv_blocks, dtype=torch.int32, device=device)
    indices = torch.arange(kv_blocks, dtype=torch.int32, device=device).expand(1, 1, q_blocks, kv_blocks)
    return BlockMask.from_kv_blocks(counts, indices.contiguous(), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(q_len, kv_len), compute_q_blocks=torch.is_grad_enabled())


def _extend_padding(padding, length, device):
    """Bool [B, length] padding, or None when nothing is padded (lets sdpa skip the mask).

    Under torch.compile a full-length mask is kept as given (nonzero = real; `padding_mask`
    reads it so): inductor's CPU flex kernel cannot lower a mask_mod that captures a tensor
    computed in the graph (torch 2.13), only one passed in, such as this mask.
    """
    keep = torch.compiler.is_compiling() and padding.shape[-1] >= length
    padding = padding.to(device=device, dtype=None if keep else torch.bool)
    if padding.shape[-1] < length:
        padding = F.pad(padding, (0, length - padding.shape[-1]), value=True)
    if not torch.compiler.is_compiling() and bool(padding.all()):
        return None
    return padding
