"""Qwen3-MoE against transformers 5.22.2 on random checkpoints it wrote: sparse MoE blocks where
`decoder_sparse_step` and `mlp_only_layers` put them (dense MLPs elsewhere), the router with and
without `norm_topk_prob`, every registered `Experts` kernel, q/k norms, biases, and a sliding window
(4, every layer) under prompts longer than it, left-padded."""

import copy
import json
import shutil

import pytest
import torch

import kernelhub
from checkpoints import QWEN3_CONFIGS, write_qwen3_checkpoint
from kernelhub.declare.errors import ConfigError
from kernelhub.models.qwen3_moe import Qwen3MoeForCausalLM

CONFIG = QWEN3_CONFIGS["qwen3_moe"]
VOCAB, LAYERS = CONFIG["vocab_size"], CONFIG["num_hidden_layers"]
# The second checkpoint: a dense layer picked by mlp_only_layers, sparse everywhere else, raw top-k weights.
OTHER = dict(decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe")
    return path, write_qwen3_checkpoint("qwen3_moe", path)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_moe_other")
    return path, write_qwen3_checkpoint("qwen3_moe", path, seed=1, **OTHER)


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)  # 12 > 3 windows
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    return ids, mask


def assert_logits_match(model, reference, atol=1e-5):
    ids, mask = padded_batch()
    valid = mask.bool()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    assert (ours[valid] - theirs[valid]).abs().max() <= atol


@pytest.mark.parametrize("step, mlp_only", [(1, []), (2, []), (3, [2]), (1, [0, 3]), (2, [1, 3])])
def test_sparse_layers_are_where_transformers_puts_them(step, mlp_only):
    import transformers

    config = {**CONFIG, "decoder_sparse_step": step, "mlp_only_layers": mlp_only}
    with torch.device("meta"):
        theirs = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**config))
        ours = Qwen3MoeForCausalLM({**config, "model_type": "qwen3_moe"})
    want = [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in theirs.model.layers]
    assert [type(layer.mlp).__name__ == "SparseMoeBlock" for layer in ours.model.layers] == want
    assert list(ours.config.sparse_layers) == want


@pytest.mark.kernelhub_backends
def test_logits_match_transformers(checkpoint, attn_backend, assert_bound):
    """Every registered backend serves qwen3_moe (none is refused for it): each gives transformers' logits."""
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=attn_backend, dtype="float32")
    for i in range(LAYERS):
        assert_bound(model, f"model.layers.{i}.self_attn.attn", attn_backend)
    assert_logits_match(model, reference)
    ids, _ = padded_batch()
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() <= 1e-5  # unpadded


def test_every_experts_kernel_gives_transformers_logits(checkpoint):
    path, reference = checkpoint
    names = sorted(kernelhub.get_registry().layer_kernels.get("Experts", {}))
    assert {"eager", "grouped_mm", "batched_mm"} <= set(names)
    for name in names:
        model = kernelhub.from_pretrained(path, attn_implementation="sdpa", kernels={"Experts": name})
        chosen = {e["path"]: e["chosen"] for e in model.binding.to_dict() if e["path"].endswith("mlp.experts")}
        assert chosen == {"model.layers.1.mlp.experts": name, "model.layers.3.mlp.experts": name}
        assert_logits_match(model, reference)
    # transformers' spelling lands in the same plan
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa", experts_implementation="grouped_mm")
    assert model.binding["model.layers.3.mlp.experts"].chosen == "grouped_mm"


def test_experts_default_to_grouped_mm_and_fall_back_to_the_reference_for_training(checkpoint):
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa")  # transformers' default, unasked
    assert model.binding["model.layers.3.mlp.experts"].chosen == "grouped_mm"
    assert_logits_match(model, reference)
    trained = kernelhub.explain(path, attn_implementation="sdpa", mode="training")
    entry = trained["model.layers.3.mlp.experts"]
    assert entry.chosen == "eager" and [name for name, _ in entry.rejected] == ["grouped_mm"]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_mlp_only_layers_and_raw_topk_weights_match_transformers(other_checkpoint, backend):
    path, reference = other_checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=backend, kernels={"Experts": "grouped_mm"})
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == \
        ["SparseMoeBlock", "MLP", "SparseMoeBlock", "SparseMoeBlock"]
    assert model.config.norm_topk_prob is False
    assert_logits_match(model, reference)


def test_norm_topk_prob_changes_the_routing_weights(checkpoint):
    """Both ways against transformers' own router, on the same weights and inputs."""
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    x = torch.randn(10, CONFIG["hidden_size"])
    ours, theirs = model.model.layers[1].mlp, reference.model.layers[1].mlp.gate
    with torch.no_grad():
        for norm in (True, False):
            ours.norm_topk_prob = theirs.norm_topk_prob = norm
            _, weights, indices = ours.route(x)
            _, want_weights, want_indices = theirs(x)
            assert torch.equal(indices, want_indices) and torch.equal(weights, want_weights)
            assert torch.allclose(weights.sum(-1), torch.ones(10)) == norm
    theirs.norm_topk_prob = True


def test_bf16_logits_are_within_bf16_error_of_transformers(checkpoint):
    """Ours in bfloat16 is as close to the float32 truth as transformers' own bfloat16 run."""
    path, reference = checkpoint
    ids, mask = padded_batch()
    valid = mask.bool()
    with torch.no_grad():
        truth = reference(ids, attention_mask=mask).logits[valid]
        theirs = copy.deepcopy(reference).to(torch.bfloat16)(ids, attention_mask=mask).logits.float()[valid]
        for experts in ("eager", "grouped_mm"):
            model = kernelhub.from_pretrained(path, attn_implementation="sdpa", kernels={"Experts": experts},
                                              dtype="bfloat16")
            ours = model(ids, attention_mask=mask).logits.float()[valid]
            scale = truth.abs().max()
            assert (ours - theirs).abs().max() <= 0.03 * scale, experts
            assert (ours - truth).abs().max() <= 2 * (theirs - truth).abs().max() + 0.01 * scale, experts


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_equal_transformers_generate(checkpoint, cache):
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa", kernels={"Experts": "grouped_mm"})
    ids, mask = padded_batch()
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=cache)
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_generate_batch_equals_per_prompt_generate(checkpoint, backend):
    """Paged continuous batching with sliding layers, chunked prefill (6-token budget), tiny blocks."""
    path, _ = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=f"paged|{backend}", kernels={"Experts": "grouped_mm"})
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 14, 1)]
    new = 4 if backend == "flash" else 10  # flash runs under the Triton interpreter here: keep it short
    expected = [model.generate(torch.tensor([p]), max_new_tokens=new)[0, len(p):].tolist() for p in prompts]
    results = model.generate_batch(prompts, max_new_tokens=new, max_batch_tokens=6, block_size=2)
    assert [r.tokens for r in results] == expected


def test_explain_shows_the_plan_without_weights(checkpoint, tmp_path):
    path, _ = checkpoint
    shutil.copy(path / "config.json", tmp_path / "config.json")  # no model.safetensors
    plan = kernelhub.explain(tmp_path, attn_implementation="flex", kernels={"Experts": "batched_mm"})
    chosen = {e["path"]: e["chosen"] for e in plan.to_dict()}
    assert {p: c for p, c in chosen.items() if p.endswith("experts")} == \
        {"model.layers.1.mlp.experts": "batched_mm", "model.layers.3.mlp.experts": "batched_mm"}
    assert chosen["model.layers.1.mlp.gate"] == chosen["model.layers.0.mlp.gate_up_proj"] == "reference"
    assert chosen["model.layers.3.self_attn.attn"] == "flex"
    assert chosen["model.layers.2.self_attn.k_norm"] == "reference"


def test_save_pretrained_writes_per_expert_tensors_transformers_loads(checkpoint, tmp_path):
    import transformers
    from safetensors import safe_open

    path, _ = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f, safe_open(path / "model.safetensors", "pt") as g:
        assert sorted(f.keys()) == sorted(g.keys())
        assert "model.layers.1.mlp.experts.7.down_proj.weight" in f.keys()
    theirs = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    theirs.set_experts_implementation("eager")
    assert_logits_match(model, theirs)


def test_config_errors_name_the_field(checkpoint, tmp_path):
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mlp_only_layers": [1, 4]}))
    with pytest.raises(ConfigError, match=r"'mlp_only_layers\[1\]' is 4 \(int\); allowed: a list of layer indices"):
        kernelhub.explain(tmp_path)
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_local_experts": 6}))
    with pytest.raises(ConfigError, match="'num_experts' is 6 but 'model.layers.1.mlp.gate.weight'"):
        kernelhub.from_pretrained(tmp_path)
