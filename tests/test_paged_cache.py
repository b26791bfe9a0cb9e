"""The paged KV cache: block pool bookkeeping, budget sizing, and every paged backend reading
keys through block tables exactly as dense attention over the same keys."""

import pytest
import torch

import kernelhub
from kernelhub.declare.attention_mask import AttentionMask
from kernelhub.declare.paged import PagedMask
from kernelhub.declare.paged_cache import BlockPool, OutOfBlocks, PagedKVCache
from kernelhub.declare.site import AttentionSite


def cache(num_blocks=8, block_size=4, layer_types=("full_attention",), window=None):
    return PagedKVCache(list(layer_types), num_kv_heads=2, head_dim=8, block_size=block_size,
                        num_blocks=num_blocks, sliding_window=window)


def test_pool_hands_out_each_block_once_and_never_the_null_block():
    pool = BlockPool(5)
    ids = pool.allocate(4)
    assert sorted(ids) == [1, 2, 3, 4]
    with pytest.raises(OutOfBlocks, match="needs 1 free blocks, 0 left"):
        pool.allocate(1)
    pool.release(ids[:2])
    assert sorted(pool.allocate(2)) == sorted(ids[:2])


def test_reserve_is_all_or_nothing():
    c = cache(num_blocks=4)
    c.reserve("a", 8)  # 2 of the 3 usable blocks
    with pytest.raises(OutOfBlocks):
        c.reserve("b", 9)
    assert "b" not in c.tables and c.free_blocks() == {"full_attention": 1}
    c.reserve("a", 12)
    assert c.block_table("a") == {"full_attention": [1, 2, 3]}


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    c = cache()
    c.reserve("a", 6)
    c.begin_step(["a"], [6], [6])
    k = torch.randn(1, 2, 6, 8)
    c.update(k, k, 0)
    c.fork("a", "b", length=6)
    a, b = c.block_table("a")["full_attention"], c.block_table("b")["full_attention"]
    assert a[0] == b[0] and a[1] != b[1]
    assert torch.equal(c.keys[0][b[1], :2], c.keys[0][a[1], :2])
    c.free("a")
    assert c.pools["full_attention"].refs[a[0]] == 1, "the shared block lives on in b"
    c.free("b")
    assert c.free_blocks() == {"full_attention": 7}


def test_sliding_group_gives_back_blocks_that_left_the_window():
    c = cache(num_blocks=10, layer_types=("full_attention", "sliding_attention"), window=4)
    c.reserve("a", 14)
    c.release_outside_window("a", 14)  # the next query (position 14) sees keys 11..14
    assert c.block_table("a")["sliding_attention"][:2] == [0, 0]
    assert 0 not in c.block_table("a")["full_attention"]
    assert c.free_blocks() == {"full_attention": 5, "sliding_attention": 7}


def test_budget_sizing_and_a_budget_too_small(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    cfg = model.config
    per_block = 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * cfg.head_dim * 4
    c = PagedKVCache.for_model(model, memory_bytes=10 * per_block + 5)
    assert c.num_blocks == 10 and c.memory_bytes == 10 * per_block
    with pytest.raises(ValueError, match="holds 1 blocks of 16 positions"):
        PagedKVCache.for_model(model, memory_bytes=per_block)


def scattered(lengths, block_size, h_kv, d, window=None):
    """Keys of several sequences written to shuffled blocks of a pool, and the same keys dense."""
    c = PagedKVCache(["sliding_attention" if window else "full_attention"], num_kv_heads=h_kv, head_dim=d,
                     block_size=block_size, num_blocks=40, sliding_window=window)
    c.pools[c.groups[0]].free_ids = __import__("collections").deque(torch.randperm(39).add(1).tolist())
    dense = []
    for i, n in enumerate(lengths):
        c.reserve(i, n)
    c.begin_step(list(range(len(lengths))), lengths, lengths)
    k, v = torch.randn(1, h_kv, sum(lengths), d), torch.randn(1, h_kv, sum(lengths), d)
    c.update(k, v, 0)
    start = 0
    for n in lengths:
        dense.append((k[:, :, start:start + n], v[:, :, start:start + n]))
        start += n
    return c, dense


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex", "flash"])
@pytest.mark.parametrize("window", [None, 3])
def test_paged_read_equals_dense_attention(backend, window):
    """A prefill chunk, a decode and a fresh prompt in one packed step, over shuffled blocks."""
    lengths, q_lens, h, h_kv, d = [9, 6, 4], [3, 1, 4], 4, 2, 16
    c, dense = scattered(lengths, 4, h_kv, d, window)
    c.begin_step([0, 1, 2], q_lens, lengths)
    mask = c.step_masks[c.groups[0]]
    q = torch.randn(1, h, sum(q_lens), d)
    site = AttentionSite(head_dim=d, num_heads=h, num_kv_heads=h_kv, sliding_window=window)
    kernelhub.bind(torch.nn.ModuleDict({"site": site}), backend)
    out = site(q, c.keys[0], c.values[0], mask)[0]
    start = 0
    site.unbind()
    for (k, v), n, q_len in zip(dense, lengths, q_lens):
        ref_mask = AttentionMask.build(batch=1, q_len=q_len, kv_len=n, q_offset=n - q_len, sliding_window=window)
        expected = site(q[:, :, start:start + q_len], k, v, ref_mask)[0]
        torch.testing.assert_close(out[:, start:start + q_len], expected, atol=1e-5, rtol=1e-5)
        start += q_len


def test_gathered_masks_are_per_sequence_never_tokens_by_tokens():
    mask = PagedMask.build(q_lens=[100, 1, 1], kv_lens=[100, 300, 50], block_tables=[[1] * 7, [2] * 19, [3] * 4],
                           block_size=16)
    assert mask.to_bool().shape == (3, 1, 100, 300)  # not (1, 1, 102, 450)
    assert mask.padded_rows().tolist()[99:] == [99, 100, 200]
