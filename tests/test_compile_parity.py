"""Whole-model `torch.compile(fullgraph=True)` gives eager's logits, per backend that declares
`compile`, with the Hub layer kernels (custom ops) bound, for prefill and a decode step.

One 2-layer Qwen2 (a full and a sliding layer, window 4; GQA 4/1; head_dim 16) and one batch
of a full row and a left-padded row cover the causal, padded and sliding masks in one graph
per step, so each backend compiles two graphs: a prefill of 8 tokens without a cache, and a
decode step over a 24-position static cache. With head_dim 16, 8 (or 16 + 8) keys and v split
from the fused qkv projection, both are the flex miscompile (max |d| ~1 before
kernelhub.backends.flex fed inductor inputs its CPU kernel computes correctly).

flash is not here: it declares compile=False. Its `varlen` format packs the real tokens with
data-dependent gathers (indices from the padding mask, max lengths read back to the host), which
a fullgraph compile cannot trace; binding it in compile mode is refused with that reason.
"""

import pytest
import torch

import kernelhub
from tests.checkpoints import write_hf_checkpoint
from tests.hub_test_kernels import HUB_KERNELS

KERNELS = {"RMSNorm": f"{HUB_KERNELS / 'rmsnorm'}", "SiLUAndMul": f"{HUB_KERNELS / 'silu-and-mul'}",
           "ApplyRotary": f"{HUB_KERNELS / 'rotary'}"}
COMPILING = ["eager", "sdpa", "flex"]
PROMPT = torch.tensor([[5, 9, 2, 7, 1, 8, 3, 6], [0, 0, 4, 7, 9, 2, 5, 3]])
REAL = torch.tensor([[1] * 8, [0, 0] + [1] * 6])  # row 0: causal only; row 1: left-padded
MAX_LEN = 24  # 16 + 8 keys: the decode step's tail is also the flex miscompile's


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from a clean dynamo: graphs and dynamic-shape guesses of earlier tests
    (other models through the same forward code) neither count toward its recompile limit nor leak in."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2-2-layers")
    write_hf_checkpoint("qwen2", path, num_hidden_layers=2)
    return path


def load(checkpoint, attn):
    model = kernelhub.from_pretrained(checkpoint, attn_implementation=attn, kernels=KERNELS, mode="compile")
    assert {e.chosen.rsplit(":", 1)[-1] for e in model.binding.entries if e.kind == "layer"} >= set(KERNELS)
    return model


# The decode mask spans the whole cache (ones past the prompt), as generate(compile=True) passes it: a
# mask shorter than the keys is extended inside the graph, which inductor's CPU flex kernel cannot lower.
PADDING = torch.nn.functional.pad(REAL, (0, MAX_LEN - 8), value=1)


def prefill(model, cache=None):
    positions = (REAL.cumsum(-1) - 1).clamp(min=0)
    return model(PROMPT, attention_mask=REAL, position_ids=positions, cache=cache).logits


def decode(model, cache):
    positions = REAL.sum(-1, keepdim=True)
    return model(torch.tensor([[11], [4]]), attention_mask=PADDING, position_ids=positions, cache=cache).logits


def graph_breaks(fn, *args) -> int:
    return torch._dynamo.explain(fn)(*args).graph_break_count


@pytest.mark.parametrize("attn", COMPILING)
def test_compiled_model_matches_eager_prefill_and_decode(checkpoint, attn):
    model = load(checkpoint, attn)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    eager_cache, compiled_cache, scratch = (model.make_cache("static", batch=2, max_len=MAX_LEN) for _ in range(3))
    with torch.no_grad():
        assert graph_breaks(prefill, model) == 0
        torch.testing.assert_close(prefill(compiled), prefill(model), atol=1e-5, rtol=1e-5, msg=f"{attn} prefill")
        prefill(model, eager_cache), prefill(model, compiled_cache)
        assert graph_breaks(decode, model, scratch) == 0
        want, got = decode(model, eager_cache), decode(compiled, compiled_cache)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{attn} decode")
        assert compiled_cache.keys[1][:, :, 8].abs().sum() > 0  # the compiled step wrote its keys


def test_the_parity_matrix_covers_every_backend_that_declares_compile_and_sliding_layers(checkpoint):
    declared = sorted(b.name for b in kernelhub.backends() if b.capabilities.compile)
    assert declared == sorted(COMPILING)
    model = load(checkpoint, "sdpa")
    assert [layer.self_attn.attn.layer_type for layer in model.model.layers] == ["full_attention",
                                                                                "sliding_attention"]
    with pytest.raises(kernelhub.BindError, match="cannot run under torch.compile"):
        kernelhub.bind(model, "flash", mode="compile")
    plan = kernelhub.bind(model, ["flash", "sdpa"], kernels=KERNELS, mode="compile")  # a chain falls back
    site = next(e for e in plan.entries if e.kind == "attention")
    assert site.chosen == "sdpa" and site.rejected[0][0] == "flash"
    assert "cannot run under torch.compile" in " ".join(site.rejected[0][1])
