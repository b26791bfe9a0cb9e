"""Every built-in backend against the eager reference and a dense float64 oracle."""

import pytest
import torch

import kernelhub
from kernelhub.declare.attention_mask import AttentionMask
from kernelhub.declare.site import AttentionSite
from oracle import dense_attention

BACKENDS = ["eager", "sdpa", "flex", "flash"]  # flash: the Triton kernel, under the interpreter here
MASKS = {
    "causal": dict(causal=True),
    "bidirectional": dict(causal=False),
    "padded": dict(causal=True, padding=True),
    "sliding": dict(causal=True, sliding_window=3),
    "chunked": dict(causal=True, chunk_size=4),
}
# bf16/fp16: a few ulps at magnitudes around 1 (outputs are convex combinations of v ~ N(0, 1)).
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
             torch.float16: dict(atol=4e-3, rtol=4e-3)}


def make_mask(kind, batch, q_len, kv_len, q_offset=0):
    opts = dict(MASKS[kind])
    if opts.pop("padding", False):
        pad = torch.ones(batch, kv_len, dtype=torch.bool)
        pad[0, :3] = False  # left padding on the first row
        opts["padding"] = pad
    return AttentionMask.build(batch=batch, q_len=q_len, kv_len=kv_len, q_offset=q_offset, **opts)


def run_backend(name, q, k, v, mask, site, sinks=None):
    backend = kernelhub.get_registry().get(name).backend
    resolution = backend.resolution(q.device, q.dtype)  # what bind would set for this device/dtype
    site.set_implementation(backend.name, resolution.fn, backend.mask_format, backend.accepts_is_causal,
                            paged_fn=resolution.paged_fn)
    out, _ = site(q, k, v, mask, sinks=sinks)
    return out


def random_sinks(heads, dtype):
    """gpt-oss attention-sink logits: random and large enough to take a visible share of each row."""
    return (torch.randn(heads) * 2 + 1).to(dtype)


# flash takes packed sequences (varlen), which cannot express chunked attention: it refuses
# that site at bind time (tests/test_flash.py), so the pair is not a parity case.
CASES = [(b, m) for b in BACKENDS for m in MASKS if (b, m) != ("flash", "chunked")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("head_dim, sinks", [(32, False), (64, False), (32, True)], ids=["32", "64", "32-sinks"])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("backend, mask_kind", CASES)
def test_backend_matches_reference_and_oracle(backend, mask_kind, groups, head_dim, sinks, dtype):
    batch, kv_heads, seq = 2, 2, 11
    q = torch.randn(batch, kv_heads * groups, seq, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, head_dim, dtype=dtype)
    sinks = random_sinks(kv_heads * groups, dtype) if sinks else None
    site = AttentionSite(head_dim=head_dim, num_heads=kv_heads * groups, num_kv_heads=kv_heads,
                         sinks=sinks is not None)
    mask = make_mask(mask_kind, batch, seq, seq)
    out = run_backend(backend, q, k, v, mask, site, sinks)
    reference = run_backend("eager", q, k, v, mask, site, sinks)
    oracle = dense_attention(q, k, v, mask.materialize("bool"), site.scaling, sinks=sinks)
    assert out.shape == (batch, seq, kv_heads * groups, head_dim)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), oracle, **TOLERANCE[dtype])
    torch.testing.assert_close(out, reference, **TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["causal", "sliding", "padded"])
@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
def test_decode_step_with_offsets(backend, mask_kind, sinks):
    """One query at the end of a longer key sequence (the decode shape), incl. a kv offset."""
    batch, heads, kv_len, d = 2, 4, 9, 32
    q = torch.randn(batch, heads, 1, d)
    k, v = torch.randn(batch, 2, kv_len, d), torch.randn(batch, 2, kv_len, d)
    mask = make_mask(mask_kind, batch, 1, kv_len, q_offset=kv_len - 1)
    sinks = random_sinks(heads, torch.float32) if sinks else None
    site = AttentionSite(head_dim=d, num_heads=heads, num_kv_heads=2, sinks=sinks is not None)
    out = run_backend(backend, q, k, v, mask, site, sinks)
    oracle = dense_attention(q, k, v, mask.materialize("bool"), site.scaling, sinks=sinks)
    torch.testing.assert_close(out.double(), oracle, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "flex", "flash"])
def test_softcap(backend):
    q, k, v = (torch.randn(1, 2, 6, 32) * 3 for _ in range(3))
    site = AttentionSite(head_dim=32, num_heads=2, softcap=5.0)
    mask = make_mask("causal", 1, 6, 6)
    out = run_backend(backend, q, k, v, mask, site)
    oracle = dense_attention(q, k, v, mask.materialize("bool"), site.scaling, softcap=5.0)
    torch.testing.assert_close(out.double(), oracle, atol=1e-5, rtol=1e-5)


def test_eager_returns_weights_that_sum_to_one():
    q, k, v = (torch.randn(1, 2, 5, 32) for _ in range(3))
    site = AttentionSite(head_dim=32, num_heads=2)
    _, weights = site(q, k, v, make_mask("sliding", 1, 5, 5))
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 5))
    assert (weights[0, 0].triu(1) == 0).all()


def test_sdpa_uses_is_causal_shortcut_without_materialising():
    """The plain causal mask is never built as a tensor for sdpa."""
    mask = make_mask("causal", 1, 7, 7)
    q = torch.randn(1, 2, 7, 32)
    site = AttentionSite(head_dim=32, num_heads=2)
    run_backend("sdpa", q, q, q, mask, site)
    assert "bool" not in mask._memo
    assert mask.shortcut == "causal"
