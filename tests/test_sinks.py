"""Attention sinks (gpt-oss): one learned logit per query head joins the softmax denominator.

The eager reference against transformers' own gpt-oss function; every backend that declares
sinks against it, and against the output without sinks (a backend that ignored them would
pass the first check only by accident: the second makes sure it cannot); the paged path;
fully masked rows; and the refusals, each with its reason. The dense matrix over masks,
GQA and dtypes is in test_backend_parity (its "sinks" cases).
"""

import types

import pytest
import torch

import kernelhub
from kernelhub.backends import flex
from kernelhub.backends.sdpa import sdpa_attention, with_sink_key
from kernelhub.declare.attention_mask import AttentionMask
from kernelhub.declare.eager import eager_attention
from kernelhub.declare.paged import PagedMask
from kernelhub.declare.site import AttentionSite
from kernelhub.registry.capabilities import AttentionBackend, Capabilities, unsupported
from flash_attn_double import install_flash_attn
from oracle import dense_attention
from test_backend_parity import make_mask, random_sinks, run_backend
from tests.unchanged import refused

SINK_BACKENDS = ["eager", "sdpa", "flex", "flash"]  # flash: the Triton kernel, under the interpreter here


class SinkModel(torch.nn.Module):
    """Two attention layers with learned sinks (a sliding one and a full one), as gpt-oss has."""

    binding = binding_request = None

    def __init__(self, heads=4, kv_heads=2, head_dim=16):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            AttentionSite(head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads, sinks=True, layer_idx=i,
                          sliding_window=4 if i == 0 else None) for i in range(2))
        self.sinks = torch.nn.Parameter(random_sinks(heads, torch.float32))

    def forward(self, q, k, v, masks):
        return [site(q, k, v, mask, sinks=self.sinks)[0] for site, mask in zip(self.layers, masks)]


# -- the eager reference ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_eager_is_transformers_gpt_oss_eager(dtype):
    """Bit for bit the function transformers runs for gpt-oss, weights included (sink column dropped)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 16, dtype=dtype), torch.randn(2, 2, 7, 16, dtype=dtype), \
        torch.randn(2, 2, 7, 16, dtype=dtype)
    sinks = random_sinks(4, dtype)
    allowed = make_mask("padded", 2, 7, 7).materialize("bool")  # row 0: three left-padded keys
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    module = types.SimpleNamespace(sinks=sinks, num_key_value_groups=2, training=False)
    theirs, their_weights = eager_attention_forward(module, q, k, v, additive, scaling=0.25)
    ours, weights = eager_attention(None, q, k, v, allowed, scaling=0.25, sinks=sinks)
    assert torch.equal(ours, theirs) and torch.equal(weights, their_weights)
    assert (weights.float().sum(-1) < 1).all()  # the sink takes a share of every row


def test_fully_masked_rows_give_zeros_on_every_backend():
    """Left padding leaves the first queries of row 0 with no visible key: only the sink remains."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    sinks = random_sinks(4, torch.float32)
    mask = make_mask("padded", 2, 6, 6)
    site = AttentionSite(head_dim=16, num_heads=4, num_kv_heads=2, sinks=True)
    for name in SINK_BACKENDS:
        out = run_backend(name, q, k, v, mask, site, sinks)
        assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3])), name
        assert out.isfinite().all(), name


# -- every backend: sinks are applied, and applied right ---------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_len, kv_len", [(7, 7), (1, 9)], ids=["prefill", "decode"])
@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_sinks_change_the_output_and_match_the_reference(backend, q_len, kv_len, dtype):
    torch.manual_seed(2)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    q = torch.randn(2, 4, q_len, 16, dtype=dtype)
    k, v = torch.randn(2, 2, kv_len, 16, dtype=dtype), torch.randn(2, 2, kv_len, 16, dtype=dtype)
    sinks = random_sinks(4, dtype)
    mask = make_mask("sliding", 2, q_len, kv_len, q_offset=kv_len - q_len)
    with_sinks = AttentionSite(head_dim=16, num_heads=4, num_kv_heads=2, sliding_window=3, sinks=True)
    without = AttentionSite(head_dim=16, num_heads=4, num_kv_heads=2, sliding_window=3)
    out = run_backend(backend, q, k, v, mask, with_sinks, sinks)
    plain = run_backend(backend, q, k, v, mask, without)
    reference = run_backend("eager", q, k, v, mask, with_sinks, sinks)
    torch.testing.assert_close(out, reference, atol=tol, rtol=tol)
    assert (out.float() - plain.float()).abs().max() > 50 * tol  # a backend ignoring sinks fails here


@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_bound_model_passes_its_sinks_through(backend):
    """Through `bind` (the plan's records, forward-only wrappers) as a model runs it."""
    torch.manual_seed(6)
    model = SinkModel()
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    masks = [AttentionMask.build(batch=2, q_len=6, sliding_window=4), make_mask("padded", 2, 6, 6)]
    with torch.no_grad():
        expected = model(q, k, v, masks)
        assert kernelhub.bind(model, backend).chosen() == {backend}
        for out, reference in zip(model(q, k, v, masks), expected):
            torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_flex_on_cpu_with_sinks_runs_uncompiled_even_when_compiling_is_on(monkeypatch):
    """torch's compiled CPU flex kernel has no log-sum-exp: flex never sends a sink site there."""
    def no_compiling():
        raise AssertionError("the compiled CPU flex kernel cannot return the LSE sinks need")

    monkeypatch.setattr(flex, "COMPILE", True)
    monkeypatch.setattr(flex, "compiled_flex_attention", no_compiling)
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    sinks = random_sinks(4, torch.float32)
    mask = make_mask("causal", 1, 5, 5)
    site = AttentionSite(head_dim=16, num_heads=4, num_kv_heads=2, sinks=True)
    out = run_backend("flex", q, k, k, mask, site, sinks)
    torch.testing.assert_close(out, run_backend("eager", q, k, k, mask, site, sinks), atol=1e-5, rtol=1e-5)


# -- the paged path ----------------------------------------------------------------------------


def paged_case(window, dtype=torch.float32):
    """Two decodes and one prompt chunk over shuffled blocks, plus the per-sequence dense oracle."""
    torch.manual_seed(3)
    h, h_kv, d, block = 4, 2, 16, 4
    q_lens, kv_lens, tables = [1, 1, 3], [6, 9, 7], [[5, 2], [1, 7, 3], [4, 6]]
    mask = PagedMask.build(q_lens=q_lens, kv_lens=kv_lens, block_tables=tables, block_size=block,
                           sliding_window=window)
    k_pool, v_pool = torch.randn(8, block, h_kv, d, dtype=dtype), torch.randn(8, block, h_kv, d, dtype=dtype)
    q = torch.randn(1, h, sum(q_lens), d, dtype=dtype)
    sinks = random_sinks(h, dtype)
    expected, start = [], 0
    for q_len, kv_len, table in zip(q_lens, kv_lens, tables):
        rows = torch.tensor([table[j // block] * block + j % block for j in range(kv_len)])
        keys = k_pool.view(-1, h_kv, d)[rows].transpose(0, 1)[None]
        values = v_pool.view(-1, h_kv, d)[rows].transpose(0, 1)[None]
        dense = AttentionMask.build(batch=1, q_len=q_len, kv_len=kv_len, q_offset=kv_len - q_len,
                                    sliding_window=window).materialize("bool")
        expected.append(dense_attention(q[:, :, start:start + q_len], keys, values, dense, d ** -0.5, sinks=sinks))
        start += q_len
    return q, k_pool, v_pool, mask, sinks, torch.cat(expected, dim=1)


@pytest.mark.parametrize("window", [None, 3], ids=["full", "sliding"])
@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_paged_path_applies_sinks(backend, window):
    q, k_pool, v_pool, mask, sinks, expected = paged_case(window)
    registered = kernelhub.get_registry().get(backend).backend
    resolution = registered.resolution("cpu", torch.float32)
    site = AttentionSite(head_dim=16, num_heads=4, num_kv_heads=2, sinks=True, sliding_window=window)
    site.set_implementation(backend, resolution.fn, registered.mask_format, registered.accepts_is_causal,
                            paged_fn=resolution.paged_fn)
    out, _ = site(q, k_pool, v_pool, mask, sinks=sinks)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    without = AttentionSite(head_dim=16, num_heads=4, num_kv_heads=2, sliding_window=window)
    without.set_binding(site.binding)
    assert (out - without(q, k_pool, v_pool, mask)[0]).abs().max() > 1e-3


# -- the site's contract -----------------------------------------------------------------------


def test_a_site_and_its_sinks_must_agree():
    q = torch.randn(1, 4, 3, 16)
    mask = make_mask("causal", 1, 3, 3)
    declared = AttentionSite(head_dim=16, num_heads=4, sinks=True)
    with pytest.raises(ValueError, match="declares sinks=True but was called without them"):
        declared(q, q, q, mask)
    with pytest.raises(ValueError, match=r"one logit per query head: shape \(4,\), got \(2,\)"):
        declared(q, q, q, mask, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="declared without sinks but was given sinks"):
        AttentionSite(head_dim=16, num_heads=4)(q, q, q, mask, sinks=torch.zeros(4))


# -- refusals ----------------------------------------------------------------------------------


def no_sinks_backend():
    return AttentionBackend(name="nosinks", fn=eager_attention, mask_format="bool",
                            capabilities=Capabilities(softcap=True), description="a backend without sinks")


def test_a_backend_without_sinks_is_refused_by_name_and_skipped_in_a_list():
    model = SinkModel()
    with kernelhub.scoped_registry():
        kernelhub.register_backend(no_sinks_backend())
        refused(model, kernelhub.BindError,
                ["nosinks", "no attention sinks (the layer 0 (sliding_attention) attention site has learned sinks)"],
                attn="nosinks")
        plan = kernelhub.bind(model, ["nosinks", "sdpa"])
    assert plan.chosen() == {"sdpa"}
    reasons = [r for e in plan.entries for name, rs in e.rejected if name == "nosinks" for r in rs]
    assert reasons == ["no attention sinks (the layer 0 (sliding_attention) attention site has learned sinks)",
                       "no attention sinks (the layer 1 (full_attention) attention site has learned sinks)"]


def test_flex_under_torch_compile_on_cpu_is_refused_with_the_reason():
    model = SinkModel()
    refused(model, kernelhub.BindError, ["log-sum-exp that sinks need", "layer 0 (sliding_attention)"],
            attn="flex", mode="compile")
    plan = kernelhub.bind(model, ["flex", "eager"], mode="compile")
    assert plan.chosen() == {"eager"}
    assert kernelhub.bind(model, "flex").chosen() == {"flex"}  # uncompiled mode: flex serves sinks on cpu


def test_sdpa_takes_sinks_on_every_device_and_mode():
    """sdpa emulates sinks with torch's own kernels (an extra zero key whose mask column is the
    sink), so nothing refuses a sink site: not CUDA, not training, not torch.compile."""
    sdpa = kernelhub.get_registry().get("sdpa").backend
    site = AttentionSite(head_dim=16, num_heads=4, num_kv_heads=2, sinks=True)
    for device, dtype in [("cpu", torch.float32), ("cuda", torch.bfloat16)]:
        for mode in ["inference", "training", "training|compile"]:
            assert unsupported(sdpa, site, device, dtype, mode=mode) == [], (device, mode)


def test_sdpa_sink_layout_with_repeated_kv_heads_matches_the_reference():
    """The layout sdpa uses on CUDA (K/V repeated per query head, no enable_gqa), run here on CPU."""
    torch.manual_seed(7)
    q, k, v = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16), torch.randn(2, 2, 6, 16)
    sinks = random_sinks(4, torch.float32)
    allowed = make_mask("padded", 2, 6, 6).materialize("bool")
    keys, values, bias = with_sink_key(q, k, v, allowed, False, sinks, repeat_kv_heads=True)
    assert keys.shape == values.shape == (2, 4, 7, 16) and bias.shape == (2, 4, 6, 7)
    assert torch.equal(bias[..., -1], sinks.view(1, 4, 1).expand(2, 4, 6))  # the extra score is the sink
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=0.25)
    expected, _ = eager_attention(None, q, k, v, allowed, scaling=0.25, sinks=sinks)
    torch.testing.assert_close(out.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)


# -- gradients: sinks emulated inside sdpa are differentiable ----------------------------------


def grads(fn, q, k, v, mask, sinks):
    """Output and d(loss)/d(q, k, v, sinks) of a fixed, non-uniform loss through `fn`."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, sinks)]
    out = fn(*leaves[:3], mask, leaves[3])
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("kind, q_len, kv_len", [("causal", 6, 6), ("causal", 1, 9), ("sliding", 7, 7),
                                                 ("padded", 6, 6)],
                         ids=["causal-shortcut", "decode-shortcut", "sliding", "padded"])
def test_sdpa_gradients_match_eager_for_q_k_v_and_sinks(kind, q_len, kv_len):
    """Through the site, as a model calls it: the causal and decode masks take the mask=None
    shortcuts, padding leaves three queries of row 0 with only their sink."""
    torch.manual_seed(8)
    q, k, v = torch.randn(2, 4, q_len, 16), torch.randn(2, 2, kv_len, 16), torch.randn(2, 2, kv_len, 16)
    sinks = random_sinks(4, torch.float32)
    mask = make_mask(kind, 2, q_len, kv_len, q_offset=kv_len - q_len)
    site = AttentionSite(head_dim=16, num_heads=4, num_kv_heads=2, sinks=True)
    assert (mask.shortcut is not None) == (kind == "causal")
    got = grads(lambda *a: run_backend("sdpa", *a[:4], site, a[4]), q, k, v, mask, sinks)
    expected = grads(lambda *a: run_backend("eager", *a[:4], site, a[4]), q, k, v, mask, sinks)
    for name, mine, theirs in zip(["out", "q", "k", "v", "sinks"], got, expected):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert got[4].abs().min() > 0  # every head's sink receives a gradient
    if kind == "padded":  # queries that see no key: zero output, and nothing flows back through them
        assert torch.equal(got[0][0, :3], torch.zeros_like(got[0][0, :3]))
        assert torch.equal(got[1][0, :, :3], torch.zeros_like(got[1][0, :, :3]))


def test_training_bind_picks_sdpa_for_sink_sites_and_trains_like_eager():
    """mode=training binds sdpa to a sink model with no rejection, and the bound model's gradients
    (inputs and the sink parameter) are eager's."""
    torch.manual_seed(9)
    model = SinkModel()
    q, k, v = (torch.randn(2, h, 6, 16, requires_grad=True) for h in (4, 2, 2))
    masks = [AttentionMask.build(batch=2, q_len=6, sliding_window=4), make_mask("padded", 2, 6, 6)]

    def backward():
        loss = sum((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum() for out in model(q, k, v, masks))
        loss.backward()
        result = [t.grad.clone() for t in (q, k, v, model.sinks)]
        for t in (q, k, v, model.sinks):
            t.grad = None
        return result

    expected = backward()
    plan = kernelhub.bind(model, ["sdpa", "eager"], mode="training")
    assert plan.chosen() == {"sdpa"} and all(not e.rejected for e in plan.entries)
    for name, mine, theirs in zip(["q", "k", "v", "sinks"], backward(), expected):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_flash_attn_cannot_take_sinks_so_flash_is_refused_on_cuda(monkeypatch):
    """flash-attn 2's kernels have no sink input: its resolution refuses sink sites (never drops
    them), float32 on CUDA still runs the Triton kernel, which has one."""
    install_flash_attn(monkeypatch)
    flash = kernelhub.get_registry().get("flash").backend
    site = AttentionSite(head_dim=16, num_heads=4, sinks=True)
    reasons = unsupported(flash, site, "cuda", torch.bfloat16)
    assert len(reasons) == 1 and "flash-attn 2.7.4 has no attention-sink input" in reasons[0], reasons
    assert unsupported(flash, site, "cuda", torch.float32) == []
    model = SinkModel().to(torch.bfloat16)
    refused(model, kernelhub.BindError, ["has no attention-sink input"], attn="flash", device="cuda")
    # Even called directly, the flash-attn path fails loudly instead of running without sinks.
    fn = flash.resolution("cuda", torch.bfloat16).fn
    mask = make_mask("causal", 1, 3, 3).materialize("varlen")
    q = torch.randn(1, 4, 3, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="s_aux"):
        fn(None, q, q, q, mask, scaling=0.25, sinks=torch.zeros(4, dtype=torch.bfloat16))


def test_sdpa_sinks_compile_whole_graph_on_cpu():
    """sdpa's sink emulation (an extra key, a mask column) compiles with fullgraph=True, which is
    why sdpa, unlike flex, serves sink sites under mode=TORCH_COMPILE on cpu."""
    torch.manual_seed(5)
    q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
    sinks = random_sinks(4, torch.float32)
    allowed = make_mask("padded", 2, 6, 6).materialize("bool")
    compiled = torch.compile(lambda *a: sdpa_attention(None, *a, scaling=0.25, sinks=sinks)[0], fullgraph=True)
    expected, _ = eager_attention(None, q, k, k, allowed, scaling=0.25, sinks=sinks)
    torch.testing.assert_close(compiled(q, k, k, allowed), expected, atol=1e-5, rtol=1e-5)
    sdpa = kernelhub.get_registry().get("sdpa").backend
    assert unsupported(sdpa, AttentionSite(head_dim=16, num_heads=4, sinks=True), "cpu", torch.float32,
                       mode="compile") == []
