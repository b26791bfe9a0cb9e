"""Qwen3 against transformers 5.22.2 on a random checkpoint it wrote: q/k norms before RoPE, an explicit
head_dim (32, not hidden / heads = 16), q/k/v/o biases, and sliding layers (window 4 on layers 1 and 2)
under prompts longer than the window, left-padded."""

import copy
import json
import shutil

import pytest
import torch

import kernelhub
from checkpoints import QWEN3_CONFIGS, write_qwen3_checkpoint
from kernelhub.declare.errors import ConfigError

CONFIG = QWEN3_CONFIGS["qwen3"]
VOCAB, WINDOW = CONFIG["vocab_size"], CONFIG["sliding_window"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    return path, write_qwen3_checkpoint("qwen3", path)


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)  # 12 > 3 windows
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    return ids, mask


def test_config_is_read_as_transformers_reads_it(checkpoint):
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    assert model.config.head_dim == 32 != CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    assert list(model.config.layer_types) == reference.config.layer_types == \
        ["full_attention", "sliding_attention", "sliding_attention"]
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == [None, WINDOW, WINDOW]
    assert model.model.layers[0].self_attn.o_proj.bias is not None  # attention_bias covers o_proj in qwen3


@pytest.mark.kernelhub_backends
def test_logits_match_transformers(checkpoint, attn_backend, assert_bound):
    """Every registered backend serves qwen3 (none is refused for it): each gives transformers' logits."""
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=attn_backend, dtype="float32")
    for i in range(CONFIG["num_hidden_layers"]):
        assert_bound(model, f"model.layers.{i}.self_attn.attn", attn_backend)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
        valid = mask.bool()
        assert (ours[valid] - theirs[valid]).abs().max() <= 1e-5
        assert (model(ids).logits - reference(ids).logits).abs().max() <= 1e-5  # unpadded: sdpa's causal shortcut


def test_bf16_logits_are_within_bf16_error_of_transformers(checkpoint):
    """In bfloat16 both implementations round differently; ours must be as close to the float32 truth as
    transformers' own bfloat16 run is (dtype-aware: a few bf16 ulps of the logits' scale)."""
    path, reference = checkpoint
    ids, mask = padded_batch()
    valid = mask.bool()
    with torch.no_grad():
        truth = reference(ids, attention_mask=mask).logits[valid]
        theirs = copy.deepcopy(reference).to(torch.bfloat16)(ids, attention_mask=mask).logits.float()[valid]
        for backend in ("eager", "sdpa"):
            model = kernelhub.from_pretrained(path, attn_implementation=backend, dtype="bfloat16")
            ours = model(ids, attention_mask=mask).logits.float()[valid]
            scale = truth.abs().max()
            assert (ours - theirs).abs().max() <= 0.03 * scale, backend
            assert (ours - truth).abs().max() <= 2 * (theirs - truth).abs().max() + 0.01 * scale, backend


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_equal_transformers_generate(checkpoint, cache):
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    ids, mask = padded_batch()
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=cache)
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_generate_batch_equals_per_prompt_generate(checkpoint, backend):
    """Paged continuous batching with sliding layers (their own block group, blocks released as they leave
    the window), chunked prefill (6-token budget) and tiny blocks."""
    path, _ = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=f"paged|{backend}")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (9, 3, 14, 1)]
    new = 4 if backend == "flash" else 10  # flash runs under the Triton interpreter here: keep it short
    expected = [model.generate(torch.tensor([p]), max_new_tokens=new)[0, len(p):].tolist() for p in prompts]
    results = model.generate_batch(prompts, max_new_tokens=new, max_batch_tokens=6, block_size=2)
    assert [r.tokens for r in results] == expected


def test_explain_shows_the_plan_without_weights(checkpoint, tmp_path):
    path, _ = checkpoint
    shutil.copy(path / "config.json", tmp_path / "config.json")  # no model.safetensors
    plan = kernelhub.explain(tmp_path, attn_implementation={"sliding_attention": "flex", "*": "sdpa"})
    chosen = {e["path"]: e["chosen"] for e in plan.to_dict()}
    assert chosen["model.layers.0.self_attn.attn"] == "sdpa"
    assert chosen["model.layers.1.self_attn.attn"] == chosen["model.layers.2.self_attn.attn"] == "flex"
    assert chosen["model.layers.0.self_attn.q_norm"] == chosen["model.layers.2.self_attn.k_norm"] == "reference"


calls = []


class RecordingRMSNorm(torch.nn.Module):
    """Transformers' RMSNorm math, recording the shape of every input it normalises."""

    def forward(self, x):
        calls.append(tuple(x.shape))
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


def test_rmsnorm_kernel_serves_the_q_and_k_norms(checkpoint):
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa", kernels={"RMSNorm": RecordingRMSNorm})
    norms = [e for e in model.binding.to_dict() if e["path"].endswith(("q_norm", "k_norm"))]
    assert len(norms) == 2 * CONFIG["num_hidden_layers"]
    assert {e["chosen"] for e in norms} == {"RecordingRMSNorm"}
    ids, mask = padded_batch()
    calls.clear()
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    heads, kv_heads, d = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"], 32
    assert calls.count((2, 12, heads, d)) == calls.count((2, 12, kv_heads, d)) == CONFIG["num_hidden_layers"]
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-5


def test_save_pretrained_loads_in_transformers(checkpoint, tmp_path):
    import transformers

    path, _ = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    model.save_pretrained(tmp_path)
    theirs = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids, _ = padded_batch()
    with torch.no_grad():
        assert (model(ids).logits - theirs(ids).logits).abs().max() <= 1e-5


def test_config_errors_name_the_field(checkpoint, tmp_path):
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_sliding_window": False}))
    with pytest.raises(ConfigError, match="'layer_types' has sliding_attention layers but there is no window"):
        kernelhub.explain(tmp_path)
    shutil.copy(path / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": 16}))
    with pytest.raises(ConfigError, match="'head_dim' is 16 but 'model.layers.0.self_attn.q_norm.weight'"):
        kernelhub.from_pretrained(tmp_path)
