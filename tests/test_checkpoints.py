"""Llama, Mistral (sliding) and Qwen2 (bias) checkpoints: every backend, transformers parity, generation."""

import pytest
import torch

import kernelhub
from checkpoints import CONFIGS, write_hf_checkpoint

BACKENDS = ["eager", "sdpa", "flex"]


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    reference = write_hf_checkpoint(request.param, path)
    return request.param, path, reference


def padded_batch():
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    return ids, mask


@pytest.mark.kernelhub_backends
def test_logits_match_transformers(checkpoint, attn_backend, assert_bound):
    model_type, path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=attn_backend, dtype="float32")
    assert_bound(model, "model.layers.0.self_attn.attn", attn_backend)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).logits
        theirs = reference(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-5
    # an unpadded batch takes the no-mask shortcut in sdpa
    with torch.no_grad():
        diff = (model(ids).logits - reference(ids).logits).abs().max()
    assert diff <= 1e-5


def test_backends_agree_on_greedy_tokens(checkpoint):
    model_type, path, _ = checkpoint
    prompt = torch.randint(0, 96, (1, 7))
    outputs = {b: kernelhub.from_pretrained(path, attn_implementation=b).generate(prompt, max_new_tokens=10)
               for b in BACKENDS}
    assert outputs["sdpa"].tolist() == outputs["eager"].tolist() == outputs["flex"].tolist()


def full_recompute_greedy(model, prompt, steps):
    ids = prompt
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
    return ids


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_generate_equals_full_recomputation(checkpoint, cache, backend):
    """Prompt + 10 tokens cross the sliding window (4) several times for mistral and qwen2."""
    _, path, _ = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=backend)
    prompt = torch.randint(0, 96, (2, 6))
    assert model.generate(prompt, max_new_tokens=10, cache=cache).tolist() == \
        full_recompute_greedy(model, prompt, 10).tolist()


def test_cached_logits_equal_uncached(checkpoint):
    """Step-by-step decoding through the dynamic cache reproduces full-sequence logits."""
    _, path, _ = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.make_cache("dynamic")
        steps = [model(ids[:, :4], cache=cache).logits]
        steps += [model(ids[:, i:i + 1], cache=cache).logits for i in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_padded_generation_matches_unpadded(checkpoint):
    """A left-padded row generates what it generates alone."""
    _, path, _ = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    short = torch.randint(0, 96, (1, 4))
    long = torch.randint(0, 96, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=6)
    assert together[0, 7:].tolist() == model.generate(short, max_new_tokens=6)[0, 4:].tolist()
    assert together[1, 7:].tolist() == model.generate(long, max_new_tokens=6)[0, 7:].tolist()


def test_bf16_load_runs_every_backend(checkpoint):
    _, path, _ = checkpoint
    ids = torch.randint(0, 96, (1, 9))
    logits = {}
    for b in BACKENDS:
        model = kernelhub.from_pretrained(path, attn_implementation=b, dtype="bfloat16")
        assert model.lm_head.weight.dtype == torch.bfloat16
        with torch.no_grad():
            logits[b] = model(ids).logits.float()
    for b in BACKENDS:
        torch.testing.assert_close(logits[b], logits["eager"], atol=0.1, rtol=0.05)


def test_save_pretrained_round_trip_keeps_binding_request(checkpoint, tmp_path):
    _, path, _ = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation={"sliding_attention": "eager", "*": "sdpa"})
    model.save_pretrained(tmp_path)
    again = kernelhub.from_pretrained(tmp_path)
    assert again.binding.to_dict() == model.binding.to_dict()
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_sharded_checkpoint_loads_like_a_single_file(checkpoint, tmp_path):
    model_type, path, reference = checkpoint
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        sharded = kernelhub.from_pretrained(tmp_path, attn_implementation="sdpa")(ids).logits
        single = kernelhub.from_pretrained(path, attn_implementation="sdpa")(ids).logits
    torch.testing.assert_close(sharded, single, atol=0, rtol=0)


def test_sampling_is_seeded_and_degenerates_to_greedy(checkpoint):
    _, path, _ = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation="sdpa")
    prompt = torch.randint(0, 96, (2, 5))

    def sample(seed, **kw):
        return model.generate(prompt, max_new_tokens=8, do_sample=True,
                              generator=torch.Generator().manual_seed(seed), **kw)

    assert sample(1).tolist() == sample(1).tolist()
    assert sample(1).tolist() != sample(2).tolist()
    greedy = model.generate(prompt, max_new_tokens=8).tolist()
    assert sample(3, top_k=1).tolist() == greedy
    assert sample(4, top_p=1e-6).tolist() == greedy
    assert sample(5, temperature=1e-4).tolist() == greedy
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(6, temperature=0)
