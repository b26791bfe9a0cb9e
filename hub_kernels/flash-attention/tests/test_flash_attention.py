"""The Triton kernel against its PyTorch reference: packed sequences, a paged cache, the
kvcache API, GQA, causal, sliding window, softcap and attention sinks (Triton runs under the interpreter on
CPU; shapes stay small)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
import flash_attention  # noqa: E402

# fp32 is computed with IEEE products; bf16/fp16: p is rounded to the input dtype, so allow a few ulps.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}
LENS_Q, LENS_K = [3, 1, 20], [3, 9, 40]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                              reason="needs a CUDA GPU"))]


def packed(lens, heads, d, dtype):
    return torch.randn(sum(lens), heads, d).to(dtype)


def cu(lens):
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


def reference(q, k, v, cu_q, cu_k, causal=False, window=(-1, -1), softcap=0.0, s_aux=None):
    right = 0 if causal else window[1]
    return flash_attention.reference_varlen_attention(q, k, v, cu_q, cu_k, None, None, q.shape[-1] ** -0.5,
                                                      softcap, window[0], right, s_aux)


def sinks(heads, dtype=torch.float32):
    """Sink logits large enough to take a visible share of every row (zeros would hide a bug)."""
    return (torch.randn(heads) * 2 + 1).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (4, 1)], ids=["mha", "gqa3", "mqa"])
@pytest.mark.parametrize("mask", ["causal", "window", "softcap", "bidirectional", "sinks", "window+sinks"])
def test_varlen_matches_reference(mask, heads, dtype, device):
    torch.manual_seed(0)
    h, h_kv = heads
    q, k, v = packed(LENS_Q, h, 24, dtype), packed(LENS_K, h_kv, 24, dtype), packed(LENS_K, h_kv, 24, dtype)
    opts = {"causal": dict(causal=True), "window": dict(causal=True, window=(5, 0)),
            "softcap": dict(causal=True, softcap=2.0), "bidirectional": dict(),
            "sinks": dict(causal=True, s_aux=sinks(h, dtype)),
            "window+sinks": dict(causal=True, window=(5, 0), s_aux=sinks(h, dtype))}[mask]
    on = [t.to(device) for t in (q, k, v, cu(LENS_Q), cu(LENS_K))]
    s_aux = opts["s_aux"].to(device) if "s_aux" in opts else None
    out = flash_attention.flash_attn_varlen_func(
        *on, max(LENS_Q), max(LENS_K), causal=opts.get("causal", False),
        window_size=opts.get("window", (-1, -1)), softcap=opts.get("softcap", 0.0), s_aux=s_aux).cpu()
    expected = reference(q, k, v, cu(LENS_Q), cu(LENS_K), **opts)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [(-1, -1), (6, 0)])
@pytest.mark.parametrize("with_sinks", [False, True], ids=["", "sinks"])
def test_paged_cache_equals_packed_keys(window, with_sinks, device):
    """The same keys scattered over shuffled blocks of a pool give the packed result."""
    torch.manual_seed(1)
    page, h, h_kv, d = 4, 4, 2, 16
    s_aux = sinks(h) if with_sinks else None
    k, v = packed(LENS_K, h_kv, d, torch.float32), packed(LENS_K, h_kv, d, torch.float32)
    q = packed(LENS_Q, h, d, torch.float32)
    blocks = [-(-n // page) for n in LENS_K]
    order = torch.randperm(sum(blocks)) + 1  # block 0 stays unused, as a null block
    k_pool, v_pool = torch.zeros(sum(blocks) + 1, page, h_kv, d), torch.zeros(sum(blocks) + 1, page, h_kv, d)
    table = torch.zeros(len(LENS_K), max(blocks), dtype=torch.int32)
    start, used = 0, 0
    for i, n in enumerate(LENS_K):
        for j in range(blocks[i]):
            block = int(order[used])
            used += 1
            table[i, j] = block
            rows = k[start + j * page:start + min((j + 1) * page, n)]
            k_pool[block, :rows.shape[0]] = rows
            v_pool[block, :rows.shape[0]] = v[start + j * page:start + min((j + 1) * page, n)]
        start += n
    on = [t.to(device) for t in (q, k_pool, v_pool, cu(LENS_Q), cu(LENS_K))]
    out = flash_attention.flash_attn_varlen_func(*on, max(LENS_Q), max(LENS_K), causal=True, window_size=window,
                                                 block_table=table.to(device),
                                                 s_aux=s_aux.to(device) if with_sinks else None).cpu()
    expected = reference(q, k, v, cu(LENS_Q), cu(LENS_K), causal=True, window=window, s_aux=s_aux)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("with_sinks", [False, True], ids=["", "sinks"])
def test_kvcache_appends_then_attends(with_sinks):
    torch.manual_seed(2)
    b, h, h_kv, d, page = 2, 4, 2, 16, 8
    s_aux = sinks(h) if with_sinks else None
    k_cache, v_cache = torch.randn(4, page, h_kv, d), torch.randn(4, page, h_kv, d)
    table = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    lens = torch.tensor([5, 9], dtype=torch.int32)
    q, k_new, v_new = torch.randn(b, 1, h, d), torch.randn(b, 1, h_kv, d), torch.randn(b, 1, h_kv, d)
    out = flash_attention.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens,
                                                  block_table=table, causal=True, s_aux=s_aux)
    assert torch.equal(k_cache[2, 5], k_new[0, 0]) and torch.equal(k_cache[1, 1], k_new[1, 0])
    for i in range(b):
        n = int(lens[i]) + 1
        rows = [int(table[i, j // page]) * page + j % page for j in range(n)]
        keys, values = k_cache.view(-1, h_kv, d)[rows], v_cache.view(-1, h_kv, d)[rows]
        expected = reference(q[i], keys, values, cu([1]), cu([n]), causal=True, s_aux=s_aux)
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=2e-5)


def test_fixed_length_api():
    torch.manual_seed(3)
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    out = flash_attention.flash_attn_func(q, k, k, causal=True)
    expected = reference(q.reshape(10, 4, 16), k.reshape(10, 2, 16), k.reshape(10, 2, 16), cu([5, 5]), cu([5, 5]),
                         causal=True)
    torch.testing.assert_close(out.reshape(10, 4, 16), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(dropout_p=0.1), "dropout_p must be 0"),
    (dict(alibi_slopes=torch.ones(4)), "no ALiBi"),
    (dict(s_aux=torch.ones(2)), r"s_aux \(attention sinks\) must be one logit per query head, shape \(4,\)"),
])
def test_unsupported_arguments_are_refused(bad, message):
    q = torch.randn(3, 4, 16)
    with pytest.raises(ValueError, match=message):
        flash_attention.flash_attn_varlen_func(q, q, q, cu([3]), cu([3]), 3, 3, **bad)


def test_sinks_take_their_share_and_fully_hidden_rows_stay_zero():
    """A sink changes every row (so a kernel ignoring it fails the comparisons above), and a row
    whose keys are all outside its window keeps only the sink: zeros, not NaN."""
    torch.manual_seed(4)
    q, k = torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    s_aux = torch.tensor([1.5, -0.5])
    plain = flash_attention.flash_attn_varlen_func(q, k, k, cu([4]), cu([4]), 4, 4, causal=True)
    sunk = flash_attention.flash_attn_varlen_func(q, k, k, cu([4]), cu([4]), 4, 4, causal=True, s_aux=s_aux)
    assert (plain - sunk).abs().amax(dim=(1, 2)).min() > 1e-2
    # Two queries over no keys at all (a sequence with an empty cache) give zeros.
    empty = flash_attention.flash_attn_varlen_func(q[:2], k, k, cu([2]), cu([0]), 2, 0, s_aux=s_aux)
    assert torch.equal(empty, torch.zeros_like(empty))
