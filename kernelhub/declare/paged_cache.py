"""A paged KV cache: fixed-size blocks in a preallocated pool, one block table per sequence.

Sequences never need contiguous memory: a sequence that grows takes another free block,
a finished one gives its blocks back, and `fork` shares a sequence's full blocks with a
new one (reference counts; the partly filled last block is copied). Full-attention and
sliding-window layers are separate groups with separate pools, because a sliding layer
gives back blocks that left its window while a full layer keeps every block.

Block 0 of every pool is a null block that is never handed out: block tables are padded
with it, and blocks released by a sliding group read as it.

>>> import torch
>>> cache = PagedKVCache(["full_attention"] * 2, num_kv_heads=1, head_dim=4, block_size=4, num_blocks=8)
>>> cache.reserve("a", 6)        # room for 6 positions: 2 blocks
>>> cache.block_table("a")
{'full_attention': [1, 2]}
>>> cache.fork("a", "b"); cache.block_table("b")["full_attention"][0] == 1   # shares the full block
True
>>> cache.free("a"); cache.free("b"); cache.free_blocks()
{'full_attention': 7}
"""

from __future__ import annotations

import collections

import torch

from kernelhub.declare.paged import PagedMask, leading_decodes
from kernelhub.declare.site import AttentionSite


class OutOfBlocks(RuntimeError):
    """The pool has too few free blocks for a reservation (nothing was allocated)."""


class BlockPool:
    """Free list and reference counts for `num_blocks` block ids (id 0 is the null block)."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.free_ids = collections.deque(range(1, num_blocks))
        self.refs = [0] * num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise OutOfBlocks(f"needs {n} free blocks, {len(self.free_ids)} left")
        ids = [self.free_ids.popleft() for _ in range(n)]
        for i in ids:
            self.refs[i] = 1
        return ids

    def share(self, ids):
        for i in ids:
            if i:
                self.refs[i] += 1

    def release(self, ids):
        for i in ids:
            if i:
                self.refs[i] -= 1
                if self.refs[i] == 0:
                    self.free_ids.append(i)


class PagedKVCache:
    """Block pools (one per layer group), block tables per sequence, and this step's layout.

    `reserve(seq, n)` makes room for `n` positions; `begin_step` fixes which sequences run
    this step and how many new tokens each brings; then the model's forward calls
    `update(k, v, layer_idx)` per layer like any cache and receives the pools to attend over.
    """

    paged = True

    def __init__(self, layer_types, *, num_kv_heads: int, head_dim: int, block_size: int = 16,
                 num_blocks: int, sliding_window: int | None = None, dtype=torch.float32, device="cpu"):
        self.layer_types = list(layer_types)
        if "sliding_attention" in self.layer_types and not sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        self.block_size, self.sliding_window = block_size, sliding_window
        self.groups = list(dict.fromkeys(self.layer_types))
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layer_types]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.layer_types]
        for t in self.keys + self.values:
            torch._dynamo.mark_static_address(t, guard=False)  # written in place by captured steps (see StaticCache)
        self.device = torch.device(device)
        self._forget_sequences()

    def reset(self) -> None:
        """Empty the cache for reuse: every block free, no sequence, the pools zeroed (a stale NaN
        in a masked slot would still reach attention's weighted sum as 0 x NaN)."""
        with torch.inference_mode():  # the pools may have been made in it
            for t in self.keys + self.values:
                t.zero_()
        self._forget_sequences()

    def _forget_sequences(self) -> None:
        self.pools = {g: BlockPool(self.num_blocks) for g in self.groups}
        self.tables: dict = {}     # seq -> {group: [block ids]}
        self.step_masks: dict[str, PagedMask] = {}
        self._slots: dict = {}

    @classmethod
    def for_model(cls, model, *, memory_bytes: int, block_size: int = 16, max_blocks: int | None = None):
        """A cache for `model` using at most `memory_bytes` (keys and values of every layer): the cache
        `spec_for_model` describes.

        >>> from kernelhub.models.llama import LlamaForCausalLM
        >>> m = LlamaForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        ...                       "num_hidden_layers": 2, "num_attention_heads": 2})
        >>> # a block: k and v, 2 layers, 16 positions, 2 kv heads, head_dim 4, fp32 = 2 KiB
        >>> PagedKVCache.for_model(m, memory_bytes=2**16, block_size=16).num_blocks
        32
        """
        return cls(**cls.spec_for_model(model, memory_bytes=memory_bytes, block_size=block_size,
                                        max_blocks=max_blocks))

    @staticmethod
    def spec_for_model(model, *, memory_bytes: int, block_size: int = 16, max_blocks: int | None = None) -> dict:
        """The keywords of the cache `for_model` makes: equal specs, interchangeable caches."""
        cfg, p = model.config, next(model.parameters())
        # the kv heads this process holds: fewer than the config's under tensor parallelism
        kv_heads = next((m.num_kv_heads for m in model.modules() if isinstance(m, AttentionSite)),
                        cfg.num_key_value_heads)
        per_block = 2 * len(cfg.layer_types) * block_size * kv_heads * cfg.head_dim * p.element_size()
        num_blocks = memory_bytes // per_block
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        if num_blocks < 2:
            raise ValueError(f"a KV cache budget of {memory_bytes} bytes holds {num_blocks} blocks of "
                             f"{block_size} positions ({per_block} bytes each); it needs at least 2")
        return dict(layer_types=list(cfg.layer_types), num_kv_heads=kv_heads, head_dim=cfg.head_dim,
                    block_size=block_size, num_blocks=num_blocks, sliding_window=cfg.sliding_window,
                    dtype=p.dtype, device=p.device)

    # -- sizes -----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[0]

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the pools (keys and values of every layer)."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def capacity(self) -> int:
        """The most positions one sequence can ever hold (every usable block of a full group)."""
        return (self.num_blocks - 1) * self.block_size

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def free_blocks(self) -> dict[str, int]:
        return {g: len(p.free_ids) for g, p in self.pools.items()}

    def used_blocks(self) -> int:
        """Blocks in use in the fullest group."""
        return max(p.num_blocks - 1 - len(p.free_ids) for p in self.pools.values())

    # -- sequences -------------------------------------------------------------------

    def block_table(self, seq) -> dict[str, list[int]]:
        return {g: list(t) for g, t in self.tables[seq].items()}

    def _missing_blocks(self, seq, positions: int) -> dict[str, int]:
        """Blocks each group must add for `seq` to hold `positions` positions."""
        tables = self.tables.get(seq)
        return {g: max(0, self.blocks_for(positions) - (len(tables[g]) if tables else 0)) for g in self.groups}

    def reserve(self, seq, positions: int):
        """Make room for `positions` positions of `seq`; raises OutOfBlocks and allocates nothing
        when a group lacks blocks."""
        need = self._missing_blocks(seq, positions)
        short = [g for g in self.groups if need[g] > len(self.pools[g].free_ids)]
        if short:
            raise OutOfBlocks(f"{seq!r} needs {need[short[0]]} more blocks of {short[0]}; "
                              f"{len(self.pools[short[0]].free_ids)} free")
        tables = self.tables.setdefault(seq, {g: [] for g in self.groups})
        for g in self.groups:
            tables[g].extend(self.pools[g].allocate(need[g]))

    def can_reserve(self, seq, positions: int) -> bool:
        return all(n <= len(self.pools[g].free_ids) for g, n in self._missing_blocks(seq, positions).items())

    def free(self, seq):
        """Give back every block of `seq` (unknown sequences are ignored)."""
        for g, table in self.tables.pop(seq, {}).items():
            self.pools[g].release(table)

    def fork(self, src, dst, length: int | None = None):
        """Make `dst` a copy of `src`'s first `length` positions (default: all its blocks): full blocks
        are shared, a partly filled last block is copied so that the two may diverge."""
        table = self.tables[src]
        length = len(table[self.groups[0]]) * self.block_size if length is None else length
        whole, partial = divmod(length, self.block_size)
        new = {}
        for g in self.groups:
            shared = table[g][:whole]
            self.pools[g].share(shared)
            new[g] = list(shared)
            if partial:
                (block,) = self.pools[g].allocate(1)
                for i, kind in enumerate(self.layer_types):
                    if kind == g:
                        self.keys[i][block].copy_(self.keys[i][table[g][whole]])
                        self.values[i][block].copy_(self.values[i][table[g][whole]])
                new[g].append(block)
        self.tables[dst] = new

    def release_outside_window(self, seq, next_position: int):
        """Give back sliding-group blocks that no query at or after `next_position` can see."""
        if "sliding_attention" not in self.tables.get(seq, {}):
            return
        table = self.tables[seq]["sliding_attention"]
        first_visible = max(0, next_position - self.sliding_window + 1)
        for i in range(first_visible // self.block_size):
            if table[i]:
                self.pools["sliding_attention"].release([table[i]])
                table[i] = 0

    # -- one forward step ------------------------------------------------------------

    def begin_step(self, seqs, q_lens, kv_lens):
        """Fix this step's layout: `seqs` run with `q_lens` new tokens each, after which they hold
        `kv_lens` positions (reserved beforehand). Builds the slot mapping and one `PagedMask` per group."""
        dev = self.device
        q = torch.tensor(q_lens, dtype=torch.int32)
        kv = torch.tensor(kv_lens, dtype=torch.int32)
        cu_q = torch.nn.functional.pad(q.cumsum(0), (1, 0)).to(torch.int32)
        width = max(self.blocks_for(n) for n in kv_lens)
        seq_of = torch.repeat_interleave(torch.arange(len(seqs)), q.long())
        positions = torch.arange(int(cu_q[-1])) - cu_q[:-1].long()[seq_of] + (kv - q).long()[seq_of]
        self.step_masks, self._slots = {}, {}
        for g in self.groups:
            rows = [self.tables[s][g][:width] for s in seqs]
            tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
            slots = tables.long()[seq_of, positions // self.block_size] * self.block_size + positions % self.block_size
            self._slots[g] = slots.to(dev)
            self.step_masks[g] = PagedMask(
                cu_seqlens_q=cu_q.to(dev), kv_lens=kv.to(dev), block_tables=tables.to(dev),
                max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens), block_size=self.block_size,
                sliding_window=self.sliding_window if g == "sliding_attention" else None,
                num_decodes=leading_decodes(q_lens))
        return positions

    def step_slots(self) -> dict:
        """{group: [T] pool rows (block * block_size + offset)} this step's tokens are written to."""
        return dict(self._slots)

    def update(self, k, v, layer_idx: int):
        """Write this step's k/v ([1, H_kv, T, D]) into the pool; return the pools to attend over."""
        slots = self._slots[self.layer_types[layer_idx]]
        k_pool, v_pool = self.keys[layer_idx], self.values[layer_idx]
        k_pool.view(-1, *k_pool.shape[2:])[slots] = k[0].transpose(0, 1).to(k_pool.dtype)
        v_pool.view(-1, *v_pool.shape[2:])[slots] = v[0].transpose(0, 1).to(v_pool.dtype)
        return k_pool, v_pool
