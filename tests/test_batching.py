"""Continuous batching: `generate_batch` and the streaming manager give exactly the tokens of
per-prompt `generate`, with every paged backend, through chunked prefill and preemption."""

import pytest
import torch

import kernelhub
from kernelhub.declare.eager import eager_attention
from kernelhub.runtime import kept_cache
from kernelhub.runtime.batching import ContinuousBatcher
from kernelhub.registry.capabilities import AttentionBackend
from kernelhub.testing.samples import smollm2_gguf
from tests.unchanged import assert_unchanged, registry_snapshot, snapshot

PAGED_BACKENDS = ["eager", "sdpa", "flex", "flash"]
LENGTHS = [1, 5, 17, 3, 40, 9, 2, 26, 12, 7, 33, 4, 21, 15, 8, 11]  # 16 prompts of different lengths


def prompts(vocab, lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def one_by_one(model, batch, max_new_tokens):
    return [model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens)[0, len(p):].tolist() for p in batch]


@pytest.fixture(scope="module")
def tiny_expected(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    batch = prompts(model.config.vocab_size)
    return batch, one_by_one(model, batch, 10)


# flash runs under the Triton interpreter here, seconds per step: it is checked on the first 5 prompts
# (the 40-token one, which chunked prefill splits, among them), the others on all 16.
FEWER_FOR_FLASH = {"flash": 5}


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_tiny_llama_batch_equals_per_prompt_generate(tiny_checkpoint, tiny_expected, backend):
    batch, expected = tiny_expected
    batch, expected = batch[:FEWER_FOR_FLASH.get(backend)], expected[:FEWER_FOR_FLASH.get(backend)]
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation=f"paged|{backend}")
    # A small token budget forces chunked prefill: the 40-token prompt spans three steps.
    results = model.generate_batch(batch, max_new_tokens=10, max_batch_tokens=24, block_size=8)
    assert [r.tokens for r in results] == expected
    assert {r.finish_reason for r in results} == {"length"}
    assert results.stats["steps"] > 10


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flash"])
def test_forced_preemption_keeps_every_token(tiny_checkpoint, tiny_expected, backend):
    batch, expected = tiny_expected
    batch, expected = batch[:FEWER_FOR_FLASH.get(backend)], expected[:FEWER_FOR_FLASH.get(backend)]
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation=f"paged|{backend}")
    cfg = model.config
    per_block = 2 * cfg.num_hidden_layers * 4 * cfg.num_key_value_heads * cfg.head_dim * 4
    results = model.generate_batch(batch, max_new_tokens=10, block_size=4, kv_memory=16 * per_block)
    assert results.stats["preemptions"] > 0
    assert [r.tokens for r in results] == expected


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_sliding_window_layers_use_their_own_block_group(tmp_path, model_type, backend):
    from checkpoints import write_hf_checkpoint

    write_hf_checkpoint(model_type, tmp_path)
    model = kernelhub.from_pretrained(tmp_path, attn_implementation=backend)
    batch = prompts(model.config.vocab_size, [9, 3, 14, 6])
    expected = one_by_one(model, batch, 8)
    results = model.generate_batch(batch, max_new_tokens=8, max_batch_tokens=8, block_size=2)
    assert [r.tokens for r in results] == expected


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("KERNELHUB_CACHE", str(tmp_path_factory.mktemp("kernelhub-cache")))
    # float weights: batched and one-by-one steps multiply different row counts, which packed kernels
    # round differently (test_gguf_compile batches packed weights)
    model = kernelhub.from_pretrained(smollm2_gguf(), attn_implementation="sdpa", dequantize=True)
    batch = prompts(model.config.vocab_size, [n + 2 for n in LENGTHS])
    yield model, batch, one_by_one(model, batch, 8)
    mp.undo()


# flash runs under the Triton interpreter here, where each program costs seconds for SmolLM2's 30 layers:
# it generates 2 tokens (a prefill and a decode) for the first 2 prompts, batched together.
@pytest.mark.parametrize("backend, new_tokens, prompts", [("eager", 8, 16), ("sdpa", 8, 16), ("flex", 8, 16),
                                                          ("flash", 2, 2)])
def test_smollm2_batch_equals_per_prompt_generate(smollm2, backend, new_tokens, prompts):
    model, batch, expected = smollm2
    kernelhub.bind(model, f"paged|{backend}")
    results = model.generate_batch(batch[:prompts], max_new_tokens=new_tokens)
    assert [r.tokens for r in results] == [e[:new_tokens] for e in expected[:prompts]]


def test_paged_flex_never_compiles(tiny_checkpoint, tiny_expected, monkeypatch):
    """Shapes change every step, so flex over a paged cache runs uncompiled even with compiling on."""
    from kernelhub.backends import flex

    def no_compiling():
        raise AssertionError("flex was compiled for a paged step")

    monkeypatch.setattr(flex, "COMPILE", True)
    monkeypatch.setattr(flex, "compiled_flex_attention", no_compiling)
    batch, expected = tiny_expected
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="paged|flex")
    assert [r.tokens for r in model.generate_batch(batch[:4], max_new_tokens=10)] == expected[:4]


def test_streaming_manager_adds_cancels_and_streams(tiny_checkpoint, tiny_expected):
    batch, expected = tiny_expected
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    batcher = ContinuousBatcher(model, max_batch_tokens=32, block_size=8, kv_memory=1 << 20)
    first = [batcher.add_request(p, max_new_tokens=10) for p in batch[:4]]
    doomed = batcher.add_request(batch[4], max_new_tokens=10, request_id="doomed")
    finished = []
    finished += batcher.step()
    batcher.cancel("doomed")  # running: it had its first chunk
    assert batcher.add_request(batch[5], max_new_tokens=10, request_id="late") == "late"
    finished += [r for r in batcher]
    by_id = {r.request_id: r for r in finished}
    assert [by_id[i].tokens for i in first] == expected[:4]
    assert by_id["late"].tokens == expected[5]
    assert by_id[doomed].finish_reason == "cancelled" and len(by_id[doomed].tokens) < 10
    assert batcher.cache.free_blocks() == {"full_attention": batcher.cache.num_blocks - 1}, "every block returned"


def test_eos_ends_a_request_early(tiny_checkpoint, tiny_expected):
    batch, expected = tiny_expected
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    eos = expected[2][3]
    results = model.generate_batch(batch[:3], max_new_tokens=10, eos_token_id=eos)
    cut = expected[2].index(eos) + 1
    assert results[2].tokens == expected[2][:cut] and results[2].finish_reason == "eos"


def test_sampling_is_reproducible_with_a_seeded_generator(tiny_checkpoint, tiny_expected):
    batch, _ = tiny_expected
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")

    def sample():
        g = torch.Generator().manual_seed(7)
        return [r.tokens for r in model.generate_batch(batch[:4], max_new_tokens=6, do_sample=True, top_k=20,
                                                       temperature=0.8, generator=g)]
    assert sample() == sample()


def test_a_request_can_sample_while_others_stay_greedy(tiny_checkpoint, tiny_expected):
    batch, expected = tiny_expected
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    batcher = ContinuousBatcher(model, kv_memory=1 << 20, generator=torch.Generator().manual_seed(3))
    greedy = [batcher.add_request(p, max_new_tokens=10) for p in batch[:3]]
    hot = batcher.add_request(batch[3], max_new_tokens=10, do_sample=True, temperature=5.0)
    results = {r.request_id: r.tokens for r in batcher}
    assert [results[i] for i in greedy] == expected[:3]
    assert results[hot] != expected[3]  # temperature 5 over 256 tokens: greedy odds are nil
    with pytest.raises(ValueError, match="unknown sampling options \\['temprature'\\]"):
        batcher.add_request([1], temprature=0.5)


def test_a_paged_bound_model_still_runs_a_plain_forward(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="paged|sdpa")
    ids = torch.randint(0, 256, (2, 5))
    with torch.no_grad():
        out = model(ids).logits
        kernelhub.bind(model, "sdpa")
        torch.testing.assert_close(out, model(ids).logits)


# -- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch, kwargs, message", [
    ([], {}, "prompts is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens must be a positive int, got 0"),
    ([[1, 2]], {"max_new_tokens": -3}, "max_new_tokens must be a positive int, got -3"),
    ([[1, 2]], {"max_new_tokens": 2.5}, "max_new_tokens must be a positive int, got 2.5"),
    ([[1, 999]], {}, r"prompt 0 has token ids outside 0..255: \[999\]"),
    (["hello"], {}, "prompt 0 must be a list of token ids, got str"),
    ([[1, 2]], {"do_sample": True, "temperature": 0}, "temperature must be > 0"),
])
def test_bad_requests_fail_before_any_work(tiny_checkpoint, batch, kwargs, message):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        model.generate_batch(batch, **kwargs)
    assert_unchanged(model, before)


def test_a_prompt_longer_than_the_cache_fails_alone(tiny_checkpoint, tiny_expected):
    batch, expected = tiny_expected
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    cfg = model.config
    per_block = 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * cfg.head_dim * 4
    long = model.generate_batch([batch[0], list(range(70)), batch[2]], max_new_tokens=10,
                                kv_memory=5 * per_block)  # 4 usable blocks of 16: 64 positions
    assert long[1].finish_reason == "error" and long[1].tokens == []
    assert "prompt of 70 tokens plus max_new_tokens=10 needs 80 KV positions; the cache holds 64" in long[1].error
    assert [long[0].tokens, long[2].tokens] == [expected[0], expected[2]]


def test_cancelling_an_unknown_request_names_the_active_ones(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    batcher = ContinuousBatcher(model, kv_memory=1 << 20)
    batcher.add_request([1, 2, 3], request_id="a")
    with pytest.raises(KeyError, match="no waiting or running request 'b' to cancel; active: 'a'"):
        batcher.cancel("b")
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        batcher.add_request([4], request_id="a")
    assert [r.request_id for r in batcher] == ["a"]


def test_closing_a_batcher_cancels_its_work_and_refuses_use(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    with ContinuousBatcher(model, kv_memory=1 << 20) as batcher:
        batcher.add_request([1, 2, 3], request_id="done", max_new_tokens=1)
        batcher.add_request([4, 5], request_id="open", max_new_tokens=50)
        stepped = batcher.step()  # one step: "done" samples its one token, "open" its first
        finished = batcher.close()
    assert [(r.request_id, r.finish_reason) for r in stepped] == [("done", "length")]
    assert [(r.request_id, r.finish_reason, len(r.tokens)) for r in finished] == [("open", "cancelled", 1)]
    assert batcher.close() == [] and list(batcher) == []
    with pytest.raises(RuntimeError, match="cannot add a request: this ContinuousBatcher is closed"):
        batcher.add_request([1])
    with pytest.raises(RuntimeError, match="cannot run a step: this ContinuousBatcher is closed"):
        batcher.step()
    assert kept_cache.kept(model, "paged") is None  # only compiled batchers keep their pool


def test_a_closed_compiled_batcher_leaves_its_pool_to_the_next(tiny_checkpoint):
    """The next compiled batcher of the same spec runs in the same pool, zeroed and with every
    block free, so graphs captured for the first replay for the second (no step compiles here)."""
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="paged|sdpa")
    first = ContinuousBatcher(model, kv_memory=1 << 20, compile=True)
    pool = first.cache
    first.add_request([1, 2, 3], max_new_tokens=4)
    pool.reserve("stray", 5)  # blocks no request holds, so cancelling on close does not free them
    pool.keys[0].fill_(float("nan"))
    with pytest.raises(RuntimeError, match="exploded"), first:
        raise RuntimeError("exploded")  # an exception in the block still leaves the pool
    assert first.cache is None and kept_cache.kept(model, "paged") is pool
    second = ContinuousBatcher(model, kv_memory=1 << 20, compile=True)
    assert second.cache is pool and pool.used_blocks() == 0  # reset: every block free
    assert not any(t.isnan().any() for t in pool.keys)
    second.close()
    other = ContinuousBatcher(model, kv_memory=2 << 20, compile=True)  # another pool size: not this pool
    assert other.cache is not pool and kept_cache.kept(model, "paged") is None


def test_paged_with_a_backend_lacking_paged_support_is_refused_at_bind(tiny_checkpoint):
    kernelhub.register_backend(AttentionBackend(name="dense_only", fn=eager_attention, mask_format="bool"))
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    before, registry_before = snapshot(model), registry_snapshot()
    with pytest.raises(kernelhub.BindError, match=r"dense_only: does not support a paged KV cache \(asked for "):
        kernelhub.bind(model, "paged|dense_only")
    assert_unchanged(model, before)
    assert registry_snapshot() == registry_before
    kernelhub.bind(model, "dense_only")  # bound without paged: batching says what to do
    with pytest.raises(ValueError, match="without paged support: model.layers.0.self_attn.attn \\(dense_only\\)"):
        model.generate_batch([[1, 2]])
