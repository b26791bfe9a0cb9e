"""Mask functions: known pictures, and random compositions agreeing across every format."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernelhub.declare import masks as M
from kernelhub.declare.attention_mask import AttentionMask
from kernelhub.declare.eager import eager_attention
from kernelhub.backends.flex import flex_attention_backend
from kernelhub.backends.sdpa import sdpa_attention


def test_ascii_pictures():
    assert AttentionMask.build(batch=1, q_len=4, sliding_window=2).to_ascii() == "x...\nxx..\n.xx.\n..xx"
    assert AttentionMask.build(batch=1, q_len=4, chunk_size=2).to_ascii() == "x...\nxx..\n..x.\n..xx"
    assert AttentionMask.build(batch=1, q_len=2, causal=False).to_ascii() == "xx\nxx"
    pad = torch.tensor([[0, 1, 1]])
    assert AttentionMask.build(batch=1, q_len=3, padding=pad).to_ascii() == "...\n.x.\n.xx"


def test_offsets_come_from_the_cache_not_cache_position():
    """Two new queries at absolute positions 5, 6 over keys 3..6 (a sliding cache kept 3..4)."""
    m = AttentionMask.build(batch=1, q_len=2, kv_len=4, q_offset=5, kv_offset=3, sliding_window=3)
    assert m.to_ascii() == "xxx.\n.xxx"


def test_all_ones_padding_is_dropped_so_sdpa_can_skip_the_mask():
    m = AttentionMask.build(batch=2, q_len=5, padding=torch.ones(2, 5))
    assert m.shortcut == "causal" and not m.batch_dependent


def test_formats_are_memoised_per_forward():
    m = AttentionMask.build(batch=1, q_len=4, sliding_window=2)
    assert m.materialize("bool") is m.materialize("bool")
    assert m.materialize("block_mask") is m.materialize("block_mask")


def test_unknown_format_names_the_valid_ones():
    m = AttentionMask.build(batch=1, q_len=4)
    try:
        m.materialize("dense")
    except ValueError as e:
        assert "additive" in str(e) and "block_mask" in str(e)
    else:
        raise AssertionError("expected ValueError")


def additive_attention(module, q, k, v, mask, *, scaling, **kw):
    """A minimal additive-mask backend, to check the additive format end to end."""
    scores = (q @ k.transpose(-1, -2)) * scaling + mask
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2), None


def recovered_pattern(fn, mask, fmt, batch, q_len, kv_len):
    """With zero queries every allowed key gets equal weight; identity values reveal which ones."""
    q = torch.zeros(batch, 1, q_len, kv_len)
    k = torch.zeros(batch, 1, kv_len, kv_len)
    v = torch.eye(kv_len).expand(batch, 1, kv_len, kv_len).contiguous()
    out, _ = fn(None, q, k, v, mask.materialize(fmt), scaling=1.0)
    return out[:, :, 0] > 1e-6  # [B, Q, KV]


# Mask expressions as data, so a failing example prints readably: ("causal",), ("sliding", 3),
# ("and", [expr, ...]), ...
primitive = st.one_of(
    st.just(("causal",)),
    st.just(("bidirectional",)),
    st.tuples(st.just("sliding"), st.integers(1, 6)),
    st.tuples(st.just("chunked"), st.integers(1, 6)),
)
expressions = st.recursive(
    primitive, lambda inner: st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=1, max_size=3)),
    max_leaves=6)


def build(expr):
    kind = expr[0]
    if kind == "causal":
        return M.causal_mask
    if kind == "bidirectional":
        return M.bidirectional_mask
    if kind == "sliding":
        return M.sliding_window_mask(expr[1])
    if kind == "chunked":
        return M.chunked_mask(expr[1])
    combine = M.and_masks if kind == "and" else M.or_masks
    return combine(*[build(e) for e in expr[1]])


@settings(max_examples=40, deadline=None)
@given(expr=expressions, q_len=st.integers(1, 9), extra_kv=st.integers(0, 6), q_offset=st.integers(0, 4),
       padded=st.booleans(), data=st.data())
def test_every_format_materialises_the_same_matrix(expr, q_len, extra_kv, q_offset, padded, data):
    batch, kv_len, mod = 2, q_len + extra_kv, build(expr)
    kv_offset = data.draw(st.integers(0, q_offset))
    if padded:
        valid = torch.tensor(data.draw(st.lists(st.booleans(), min_size=2 * (kv_offset + kv_len),
                                                max_size=2 * (kv_offset + kv_len)))).view(2, -1)
        mod = M.and_masks(mod, M.padding_mask(valid))
    mask = AttentionMask(mod, batch=batch, q_len=q_len, kv_len=kv_len, q_offset=q_offset, kv_offset=kv_offset,
                         batch_dependent=padded)
    expected = torch.zeros(batch, q_len, kv_len, dtype=torch.bool)
    for b in range(batch):
        for i in range(q_len):
            for j in range(kv_len):
                expected[b, i, j] = bool(mod(torch.tensor(b), torch.tensor(0), torch.tensor(i + q_offset),
                                             torch.tensor(j + kv_offset)))
    assert torch.equal(mask.materialize("bool")[:, 0].expand(batch, -1, -1), expected)
    assert torch.equal((mask.materialize("additive") == 0)[:, 0].expand(batch, -1, -1), expected)
    for fn, fmt in [(eager_attention, "bool"), (sdpa_attention, "bool"), (additive_attention, "additive"),
                    (flex_attention_backend, "block_mask")]:
        assert torch.equal(recovered_pattern(fn, mask, fmt, batch, q_len, kv_len), expected), fmt


@pytest.mark.parametrize("extra", [{}, {"sliding_window": 3}, {"padding": torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])}])
def test_a_device_held_query_offset_builds_the_same_mask_without_host_shortcuts(extra):
    """A compiled step's static cache gives its position as a 0-d tensor: the mask must be the one an
    int gives, and no shortcut may read the tensor on the host (a graph break, or a stale decision)."""
    host = AttentionMask.build(batch=2, q_len=1, kv_len=6, q_offset=5, **extra)
    device = AttentionMask.build(batch=2, q_len=1, kv_len=6, q_offset=torch.tensor(5), **extra)
    assert device.shortcut is None
    assert torch.equal(host.materialize("bool").expand(2, 1, 1, 6), device.materialize("bool").expand(2, 1, 1, 6))
    with pytest.raises(ValueError, match="the varlen mask format needs the cache position on the host"):
        device.materialize("varlen")


def test_a_plain_decode_mask_with_a_host_offset_still_takes_its_shortcut():
    assert AttentionMask.build(batch=1, q_len=1, kv_len=6, q_offset=5).shortcut == "all"
