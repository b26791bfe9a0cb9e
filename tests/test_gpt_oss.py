"""gpt-oss against transformers 5.22.2 on a random checkpoint it wrote: attention sinks, sliding/full
layers, q/k/v/o biases, YaRN RoPE, a biased router and biased clamped-SwiGLU experts; every backend the
plan accepts, refusals with their reasons, experts kernels, and the checkpoint layout both ways."""

import copy
import json
import re
import shutil

import pytest
import torch

import kernelhub
from checkpoints import FAMILY_CONFIGS, write_family_checkpoint
from kernelhub.backends.sdpa import sdpa_attention
from kernelhub.models.gpt_oss import GptOssConfig
from kernelhub.models.rope import rope_attention_factor, rope_inverse_frequencies
from tests.unchanged import refused

# On CPU every registered backend has sinks (sdpa through an extra zero key whose mask column is the sink, flash
# through the Triton kernel under the interpreter); refusals are tested with a sink-less backend.
ACCEPTED = ["eager", "sdpa", "flex", "flash"]
VOCAB = FAMILY_CONFIGS["gpt_oss"]["vocab_size"]
WINDOW = FAMILY_CONFIGS["gpt_oss"]["sliding_window"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    return path, write_family_checkpoint("gpt_oss", path)


@pytest.fixture(scope="module")
def eager_model(checkpoint):
    return kernelhub.from_pretrained(checkpoint[0], attn_implementation="eager", dtype="float32")


def padded_batch(seed=1):
    """Two rows of 12 tokens (3x the sliding window), the second left-padded by 5."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    return ids, mask


def logits_error(model, reference, ids, mask):
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    valid = mask.bool()
    return (ours[valid] - theirs[valid]).abs().max().item()


def test_every_registered_backend_is_tested_here():
    assert {b.name for b in kernelhub.backends()} == set(ACCEPTED)


@pytest.mark.parametrize("backend", ACCEPTED)
def test_logits_match_transformers(checkpoint, backend):
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=backend, dtype="float32")
    assert {e.chosen for e in model.binding.entries if e.kind == "attention"} == {backend}
    ids, mask = padded_batch()
    assert ids.shape[1] > WINDOW
    assert logits_error(model, reference, ids, mask) <= 1e-5


@pytest.mark.parametrize("experts", ["grouped_mm", "batched_mm"])
def test_experts_kernels_match_transformers(checkpoint, experts):
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa", kernels={"Experts": experts})
    assert model.binding["model.layers.0.mlp.experts"].chosen == experts
    assert logits_error(model, reference, *padded_batch()) <= 1e-5


def test_sinks_clamp_router_bias_and_yarn_matter(eager_model):
    """The checkpoint is sized so that each gpt-oss detail changes the logits."""
    ids, _ = padded_batch()

    def changed(edit):
        variant = copy.deepcopy(eager_model)
        edit(variant)
        with torch.no_grad():
            return (variant(ids).logits - eager_model(ids).logits).abs().max().item() > 1e-3

    layers = lambda m: m.model.layers  # noqa: E731
    assert changed(lambda m: [layer.self_attn.sinks.data.zero_() for layer in layers(m)])
    assert changed(lambda m: [setattr(layer.mlp.experts, "limit", 100.0) for layer in layers(m)])
    assert changed(lambda m: [layer.mlp.router.bias.data.zero_() for layer in layers(m)])
    assert changed(lambda m: setattr(m.model.rotary_emb, "attention_factor", 1.0))
    sinks = torch.cat([layer.self_attn.sinks for layer in eager_model.model.layers])
    assert sinks.abs().min() > 0 and sinks.std() > 0.1


@pytest.mark.parametrize("rope", [
    {"factor": 4.0, "truncate": False, "original_max_position_embeddings": 32},
    {"factor": 32.0, "beta_fast": 16.0, "beta_slow": 2.0, "original_max_position_embeddings": 64},
    {"factor": 8.0, "mscale": 0.9, "mscale_all_dim": 0.7, "original_max_position_embeddings": 16},
    {"factor": 2.0, "attention_factor": 1.25, "original_max_position_embeddings": 64},
], ids=["truncate-off", "betas", "mscale", "attention-factor"])
def test_yarn_rope_equals_transformers(rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fields = dict(FAMILY_CONFIGS["gpt_oss"], rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, **rope})
    theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.GptOssConfig(**fields))
    ours = GptOssConfig.from_dict({"model_type": "gpt_oss", **fields})
    assert torch.equal(rope_inverse_frequencies(ours), theirs)
    assert rope_attention_factor(ours) == their_factor


def test_bf16_matches_transformers_within_bf16_tolerance(checkpoint):
    path, reference = checkpoint
    theirs_model = copy.deepcopy(reference).to(torch.bfloat16)
    ids, mask = padded_batch()
    valid = mask.bool()
    with torch.no_grad():
        exact = reference(ids, attention_mask=mask).logits[valid]
        theirs = theirs_model(ids, attention_mask=mask).logits.float()[valid]
        for backend in ("eager", "sdpa", "flex"):
            model = kernelhub.from_pretrained(path, attn_implementation=backend, dtype="bfloat16")
            assert model.lm_head.weight.dtype == torch.bfloat16
            ours = model(ids, attention_mask=mask).logits.float()[valid]
            # as close to transformers' bf16 as transformers' bf16 is to fp32 (a few bf16 ulps of the logits)
            bound = max(2 * (theirs - exact).abs().max().item(), 4 * 2 ** -8 * exact.abs().max().item())
            assert (ours - theirs).abs().max() <= bound, backend


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_match_transformers(checkpoint, eager_model, cache):
    _, reference = checkpoint
    ids, mask = padded_batch(seed=2)
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    ours = eager_model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=cache, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("backend", ["paged|eager", "paged|sdpa", "paged|flex", "paged|flash"])
def test_generate_batch_equals_per_prompt_generate(checkpoint, eager_model, backend):
    """Paged cache with blocks of 2 < window 4: sliding layers give blocks back, sinks on every layer."""
    model = kernelhub.from_pretrained(checkpoint[0], attn_implementation=backend)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 9, 6)]
    results = model.generate_batch(prompts, max_new_tokens=8, block_size=2, max_batch_tokens=8, eos_token_id=None)
    for prompt, result in zip(prompts, results):
        alone = eager_model.generate([prompt], max_new_tokens=8, eos_token_id=None)[0, len(prompt):].tolist()
        assert result.tokens == alone


def test_explain_shows_the_plan_without_weights(checkpoint, tmp_path):
    shutil.copy(checkpoint[0] / "config.json", tmp_path / "config.json")
    plan = kernelhub.explain(tmp_path, kernels={"Experts": "grouped_mm"})
    assert {e.chosen for e in plan.entries if e.kind == "attention"} == {"sdpa"}
    experts = [e for e in plan.entries if e.source.endswith("(Experts)")]
    assert [e.path for e in experts] == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    assert {e.chosen for e in experts} == {"grouped_mm"}


def test_save_pretrained_writes_gpt_oss_files_transformers_reads(checkpoint, eager_model, tmp_path):
    import transformers

    eager_model.save_pretrained(tmp_path)
    again = transformers.GptOssForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    again.set_attn_implementation("eager")
    again.set_experts_implementation("eager")
    assert logits_error(eager_model, again, *padded_batch()) <= 1e-5
    reloaded = kernelhub.from_pretrained(tmp_path, attn_implementation="eager")
    ids, _ = padded_batch()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, eager_model(ids).logits)


def no_sink_sdpa(module, q, k, v, mask, *, scaling, dropout=0.0):
    return sdpa_attention(module, q, k, v, mask, scaling=scaling, dropout=dropout)


def test_a_backend_without_sinks_is_refused_with_the_reason(eager_model):
    kernelhub.register_backend(kernelhub.AttentionBackend(
        name="nosinks", fn=no_sink_sdpa, mask_format="bool", capabilities=kernelhub.Capabilities(sinks=False)))
    refused(eager_model, kernelhub.BindError, ["'nosinks' cannot serve attention", "no attention sinks"],
            attn="nosinks")
    model = copy.deepcopy(eager_model)
    plan = kernelhub.bind(model, ["nosinks", "sdpa"])  # a preference list falls through, the reason kept
    entry = plan["model.layers.0.self_attn.attn"]
    assert entry.chosen == "sdpa"
    assert [n for n, reasons in entry.rejected if any("no attention sinks" in r for r in reasons)] == ["nosinks"]


class BiaslessExperts(torch.nn.Module):
    """An experts kernel for plain silu experts: declares the clamped SwiGLU but not biases."""

    supports = ("swiglu_clamped",)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        raise AssertionError("a refused kernel never runs")


class UnclampedExperts(BiaslessExperts):
    supports = ("bias",)


@pytest.mark.parametrize("kernel, reason", [
    (BiaslessExperts, "lacks bias support; model.layers.0.mlp.experts has expert biases"),
    (UnclampedExperts, "lacks swiglu_clamped support; model.layers.0.mlp.experts uses the clamped SwiGLU"),
], ids=["no-bias", "no-clamped-swiglu"])
def test_an_experts_kernel_lacking_a_feature_is_refused(eager_model, kernel, reason):
    refused(eager_model, kernelhub.BindError, [reason], kernels={"Experts": kernel})
    plan = kernelhub.bind(copy.deepcopy(eager_model), "eager", kernels={"Experts": [kernel, "reference"]})
    assert plan["model.layers.0.mlp.experts"].chosen == "reference"


@pytest.mark.parametrize("field, value, allowed", [
    ("quantization_config", {"quant_method": "mxfp4"}, "null: load a dequantized checkpoint"),
    ("output_router_logits", "yes", "true, false or null"),
    ("num_experts_per_tok", 5, "at most num_local_experts (4)"),
    ("rope_parameters", {"rope_type": "yarn", "factor": 0}, "a number > 0"),
])
def test_bad_config_fields_are_refused_by_name(checkpoint, tmp_path, field, value, allowed):
    config = json.loads((checkpoint[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(kernelhub.ConfigError, match=r"is .*; allowed: " + re.escape(allowed)):
        kernelhub.explain(tmp_path)
