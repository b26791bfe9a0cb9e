"""Attention over a paged KV cache: the per-step `PagedMask`, and the dense way to read it.

In a continuous-batching step the queries of every scheduled sequence are packed into one
row ([1, H, T, D]) and keys live in a block pool ([num_blocks, block_size, H_kv, D]). The
`PagedMask` says, per sequence, how many queries it has, how many keys it has cached and
which blocks hold them. Causality is bottom-right: a sequence's queries are its last
`q_len` positions.

`paged_dense` serves a paged cache with any dense attention function (the eager
reference, sdpa, flex): keys are gathered into a [B, H_kv, max_kv, D] batch with a
per-sequence mask ([B, 1, max_q, max_kv]: never a [tokens x tokens] mask). The other ways
a backend may read the pool (varlen, block tables) are in `kernelhub.backends.paged_attention`.

>>> import torch
>>> pm = PagedMask.build(q_lens=[2, 1], kv_lens=[2, 5], block_tables=[[1], [2, 3]], block_size=4)
>>> pm.to_bool()[1, 0].int().tolist()   # one query: the second row is padding
[[1, 1, 1, 1, 1], [0, 0, 0, 0, 0]]
>>> pm.to_bool()[0, 0].int().tolist()
[[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
"""

from __future__ import annotations

import torch



def leading_decodes(q_lens) -> int:
    """How many sequences at the front of a step bring one query each (the scheduler puts decodes first)."""
    return next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))


class PagedMask:
    """Which cached keys each packed query sees, for one step and one layer group."""

    def __init__(self, *, cu_seqlens_q, kv_lens, block_tables, max_seqlen_q, max_seqlen_k, block_size,
                 sliding_window=None, num_decodes=0):
        self.cu_seqlens_q, self.kv_lens, self.block_tables = cu_seqlens_q, kv_lens, block_tables
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen_q, max_seqlen_k
        self.block_size, self.sliding_window = block_size, sliding_window
        # The scheduler puts decodes (one query each) first; gathering backends run them apart
        # from prompt chunks so that a decode is never padded to a chunk's length.
        self.num_decodes = num_decodes
        self.device = cu_seqlens_q.device
        self.q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
        self.cu_seqlens_k = torch.nn.functional.pad(kv_lens.cumsum(0), (1, 0)).to(torch.int32)
        # flash `window_size`: (left, right); always causal.
        self.window = (sliding_window - 1, 0) if sliding_window else (-1, 0)
        self._memo: dict = {}

    @classmethod
    def build(cls, *, q_lens, kv_lens, block_tables, block_size, sliding_window=None, device="cpu"):
        """From plain lists (tests, examples); the cache builds its masks from tensors directly."""
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32,
                              device=device)
        cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
        return cls(cu_seqlens_q=cu_q, kv_lens=torch.tensor(kv_lens, dtype=torch.int32, device=device),
                   block_tables=tables, max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens),
                   block_size=block_size, sliding_window=sliding_window, num_decodes=leading_decodes(q_lens))

    @property
    def batch(self) -> int:
        return self.kv_lens.shape[0]

    def attend(self, fn, module, q, k_pool, v_pool, **kw):
        """Run a paged attention function `fn` over this step (a compiled step's mask, in
        `kernelhub.runtime.compiled_batching`, runs it as one opaque op instead)."""
        return fn(module, q, k_pool, v_pool, self, **kw)

    def memo(self, key, build):
        """Build a derived tensor once per step; every layer of the group shares it."""
        out = self._memo.get(key)
        if out is None:
            out = self._memo[key] = build()
        return out

    def split_decodes(self) -> list[tuple[slice, "PagedMask"]]:
        """[(packed query slice, mask)]: the leading decodes and the prompt chunks as two masks
        when both are present, else just this mask."""
        k = self.num_decodes
        if k == 0 or k == self.batch:
            return [(slice(None), self)]

        def build():
            cut = int(self.cu_seqlens_q[k])
            parts = []
            for seqs, tokens, max_q in ((slice(0, k), slice(0, cut), 1),
                                        (slice(k, None), slice(cut, None), self.max_seqlen_q)):
                kv = self.kv_lens[seqs]
                parts.append((tokens, PagedMask(
                    cu_seqlens_q=self.cu_seqlens_q[seqs.start:(seqs.stop + 1 if seqs.stop else None)] -
                    self.cu_seqlens_q[seqs.start], kv_lens=kv, block_tables=self.block_tables[seqs],
                    max_seqlen_q=max_q, max_seqlen_k=int(kv.max()), block_size=self.block_size,
                    sliding_window=self.sliding_window)))
            return parts
        return self.memo("split_decodes", build)

    # -- positions -------------------------------------------------------------------

    def padded_rows(self) -> torch.Tensor:
        """For each packed query, its row in a [B * max_q] padded layout."""
        def build():
            seq = torch.repeat_interleave(torch.arange(self.batch, device=self.device), self.q_lens)
            local = torch.arange(seq.shape[0], device=self.device) - self.cu_seqlens_q[:-1].long()[seq]
            return seq * self.max_seqlen_q + local
        return self.memo("padded_rows", build)

    def key_slots(self) -> torch.Tensor:
        """Pool rows (block * block_size + offset) of every sequence's keys, packed in order."""
        def build():
            seq = torch.repeat_interleave(torch.arange(self.batch, device=self.device), self.kv_lens.long())
            pos = torch.arange(seq.shape[0], device=self.device) - self.cu_seqlens_k[:-1].long()[seq]
            block = self.block_tables.long()[seq, pos // self.block_size]
            return block * self.block_size + pos % self.block_size
        return self.memo("key_slots", build)

    # -- mask formats for the gathered (dense) layout ------------------------------------

    def _allowed(self, b, q_idx, kv_idx):
        q_len, kv_len = self.q_lens[b], self.kv_lens[b].long()
        q_pos = q_idx + kv_len - q_len
        ok = (q_idx < q_len) & (kv_idx < kv_len) & (kv_idx <= q_pos)
        if self.sliding_window:
            ok = ok & (kv_idx > q_pos - self.sliding_window)
        return ok

    def to_bool(self) -> torch.Tensor:
        """[B, 1, max_q, max_kv] bool, True where a query may see a key."""
        def build():
            b = torch.arange(self.batch, device=self.device).view(-1, 1, 1, 1)
            q = torch.arange(self.max_seqlen_q, device=self.device).view(1, 1, -1, 1)
            kv = torch.arange(self.max_seqlen_k, device=self.device).view(1, 1, 1, -1)
            return self._allowed(b, q, kv)
        return self.memo("bool", build)

    def materialize(self, fmt: str, dtype=torch.float32):
        """The gathered-layout mask in `fmt` ("bool", "additive", "block_mask")."""
        if fmt == "bool":
            return self.to_bool()
        if fmt == "additive":
            return self.memo(("additive", dtype), lambda: torch.zeros(self.to_bool().shape, dtype=dtype,
                                                                       device=self.device)
                             .masked_fill(~self.to_bool(), float("-inf")))
        if fmt == "block_mask":
            from torch.nn.attention.flex_attention import create_block_mask

            def mod(b, h, q_idx, kv_idx):
                return self._allowed(b, q_idx, kv_idx)
            return self.memo("block_mask", lambda: create_block_mask(
                mod, self.batch, None, self.max_seqlen_q, self.max_seqlen_k, device=self.device))
        raise ValueError(f"a paged cache cannot be read in mask format {fmt!r}; valid: bool, additive, "
                         "block_mask, varlen")

    def __repr__(self):
        return (f"PagedMask(batch={self.batch}, q={self.q_lens.tolist()}, kv={self.kv_lens.tolist()}, "
                f"window={self.sliding_window})")


def gather_keys(pool: torch.Tensor, mask: PagedMask) -> torch.Tensor:
    """[num_blocks, block_size, H_kv, D] -> [B, H_kv, max_kv, D] through the block tables."""
    blocks = -(-mask.max_seqlen_k // mask.block_size)
    tables = mask.block_tables[:, :blocks].long()
    b, h, d = mask.batch, pool.shape[2], pool.shape[3]
    return pool[tables].view(b, blocks * mask.block_size, h, d)[:, :mask.max_seqlen_k].transpose(1, 2)


def paged_dense(fn, mask_format: str):
    """Serve a paged cache with a dense backend `fn` by gathering keys per sequence."""

    def attention(module, q, k_pool, v_pool, mask: PagedMask, *, scaling, dropout=0.0, **kw):
        parts = mask.split_decodes()
        if len(parts) == 1:
            return gathered(module, q, k_pool, v_pool, mask, scaling=scaling, dropout=dropout, **kw)
        return torch.cat([gathered(module, q[:, :, rows], k_pool, v_pool, part, scaling=scaling, dropout=dropout,
                                   **kw)[0] for rows, part in parts], dim=1), None

    def gathered(module, q, k_pool, v_pool, mask: PagedMask, *, scaling, dropout=0.0, **kw):
        h, d = q.shape[1], q.shape[3]
        decode = mask.max_seqlen_q == 1  # one query per sequence: the packed row is already the batch
        if decode:
            padded = q[0].transpose(0, 1).unsqueeze(2)
        else:
            rows = mask.padded_rows()
            padded = q.new_zeros(mask.batch * mask.max_seqlen_q, h, d)
            padded[rows] = q[0].transpose(0, 1)
            padded = padded.view(mask.batch, mask.max_seqlen_q, h, d).transpose(1, 2)
        k, v = gather_keys(k_pool, mask), gather_keys(v_pool, mask)
        dense = mask.materialize(mask_format, q.dtype) if mask_format != "none" else None
        out, _ = fn(module, padded, k, v, dense, scaling=scaling, dropout=dropout, **kw)
        out = out.reshape(mask.batch * mask.max_seqlen_q, h, d)
        return (out if decode else out[rows])[None], None

    return attention
