"""`SamplingParams`: one validation for every caller, one sampling function, per-call batch stats."""

import dataclasses
import math
import re
import threading

import pytest
import torch

import kernelhub
from kernelhub.runtime.batching import ContinuousBatcher, generate_batch
from kernelhub.runtime.generate import generate
from kernelhub.declare.errors import SamplingError
from kernelhub.runtime.sampling import SamplingParams, argmax_rows, sample
from tests.unchanged import assert_unchanged, snapshot
from threads import run_in_threads

FIELDS = ["do_sample", "eos_token_id", "max_length", "max_new_tokens", "min_new_tokens", "pad_token_id",
          "repetition_penalty", "seed", "stop_strings", "temperature", "top_k", "top_p"]
SAMPLED = {"do_sample": True, "temperature": 0.8, "top_k": 20, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    with kernelhub.scoped_registry(fresh=True, autoload=False):
        return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="paged|sdpa")


# -- validation --------------------------------------------------------------------------

TOP_K, TOP_P = "None \\(off\\) or an int >= 1", "None \\(off\\) or a number in \\(0, 1\\]"
SEED = "None or an int in 0..2\\*\\*64-1"
BAD = [  # field, value, what the message says is allowed (a regex)
    ("max_new_tokens", "8", "a positive int"), ("max_new_tokens", True, "a positive int"),
    ("max_new_tokens", 2.5, "a positive int"), ("max_new_tokens", 0, "a positive int"),
    ("do_sample", 1, "True or False"), ("do_sample", "yes", "True or False"),
    ("temperature", "0.7", "> 0"), ("temperature", True, "> 0"), ("temperature", 0, "> 0"),
    ("temperature", -1.0, "> 0"), ("temperature", math.inf, "> 0"), ("temperature", math.nan, "> 0"),
    ("top_k", 2.0, TOP_K), ("top_k", False, TOP_K), ("top_k", 0, TOP_K),
    ("top_p", "0.9", TOP_P), ("top_p", 0, TOP_P), ("top_p", 1.5, TOP_P),
    ("eos_token_id", 2.0, "None, a token id"), ("eos_token_id", -1, "None, a token id"),
    ("eos_token_id", (3, -1), "None, a token id"),
    ("seed", "1", SEED), ("seed", -1, SEED), ("seed", 2**64, SEED),
]


@pytest.mark.parametrize("field, value, allowed", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_each_field_is_checked_for_type_and_range(field, value, allowed):
    message = f"^{field} must be {allowed}.*, got {re.escape(repr(value))} \\({type(value).__name__}\\)$"
    with pytest.raises(SamplingError, match=message) as info:
        SamplingParams(**{field: value})
    assert isinstance(info.value, kernelhub.KernelhubError)  # the CLI prints these as one line
    with pytest.raises(SamplingError, match=f"^{field} must be "):
        SamplingParams.from_kwargs(**{field: value})


def test_good_values_pass_and_params_are_frozen():
    params = SamplingParams(max_new_tokens=1, do_sample=True, temperature=2, top_k=1, top_p=1.0, eos_token_id=0,
                            seed=2**64 - 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5
    assert SamplingParams.from_kwargs(params) is params
    assert SamplingParams.from_kwargs(params, top_k=None) == dataclasses.replace(params, top_k=None)


def test_an_unknown_keyword_lists_the_valid_ones_closest_first():
    with pytest.raises(SamplingError, match=r"unknown sampling options \['temprature'\]; valid: temperature, ") as info:
        SamplingParams.from_kwargs(temprature=0.5)
    assert sorted(str(info.value).split("valid: ")[1].split(", ")) == FIELDS


def test_sampling_must_be_a_sampling_params(model):
    with pytest.raises(SamplingError, match="sampling must be a SamplingParams, got dict"):
        generate(model, [1, 2], sampling={"temperature": 0.5})


@pytest.mark.parametrize("call", ["generate", "generate_batch", "ContinuousBatcher", "add_request"])
def test_every_caller_validates_the_same_way_before_any_work(model, call):
    before = snapshot(model)
    run = {"generate": lambda **kw: generate(model, [1, 2], **kw),
           "generate_batch": lambda **kw: generate_batch(model, [[1, 2]], **kw),
           "ContinuousBatcher": lambda **kw: ContinuousBatcher(model, kv_memory=1 << 20, **kw),
           "add_request": lambda **kw: ContinuousBatcher(model, kv_memory=1 << 20).add_request([1, 2], **kw)}[call]
    with pytest.raises(SamplingError, match="^top_k must be None \\(off\\) or an int >= 1, got 0 \\(int\\)$"):
        run(do_sample=True, top_k=0)
    with pytest.raises(SamplingError, match=r"^unknown (sampling|generate) options \['topk'\]; valid: top_k, "):
        run(topk=3)
    if call != "add_request":  # a request takes no generator: its seed makes its own
        with pytest.raises(SamplingError, match="^pass seed \\(1\\) or generator, not both"):
            run(seed=1, generator=torch.Generator())
    assert_unchanged(model, before)


# -- one sampling function, the same tokens everywhere ------------------------------------

def test_sample_filters_then_draws():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert sample(logits, SamplingParams()).tolist() == [1]
    assert sample(logits, SamplingParams(do_sample=True, top_k=1), g).tolist() == [1]
    assert sample(logits, SamplingParams(do_sample=True, top_p=1e-6), g).tolist() == [1]
    drawn = {int(sample(logits, SamplingParams(do_sample=True, top_k=2), g)) for _ in range(50)}
    assert drawn == {1, 3}


def test_keywords_override_the_sampling_params(model):
    out = generate(model, [1, 2], sampling=SamplingParams(max_new_tokens=8), max_new_tokens=3)
    assert out.shape == (1, 5)
    assert [len(r.tokens) for r in generate_batch(model, [[1, 2]], sampling=SamplingParams(max_new_tokens=8),
                                                  max_new_tokens=3)] == [3]


def test_an_empty_eos_list_turns_off_the_checkpoints_end_token(model):
    prompt = [5, 17, 42, 7, 99]
    first = generate(model, [prompt], max_new_tokens=1)[0, -1].item()
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = first  # the config's end token comes first
    try:
        assert generate(model, [prompt], max_new_tokens=6).shape[1] == len(prompt) + 1
        off = SamplingParams(eos_token_id=[])
        assert generate(model, [prompt], max_new_tokens=6, sampling=off).shape[1] == len(prompt) + 6
        result = generate_batch(model, [prompt], max_new_tokens=6, sampling=off)[0]
        assert (len(result.tokens), result.finish_reason) == (6, "length")
    finally:
        model.generation_config.eos_token_id = saved


def test_generate_and_generate_batch_sample_the_same_tokens(model):
    prompt = [5, 17, 42, 7, 99]
    greedy = generate(model, [prompt], max_new_tokens=8)[0, len(prompt):].tolist()
    by_seed = generate(model, [prompt], seed=7, **SAMPLED)[0, len(prompt):].tolist()
    assert by_seed != greedy  # it really sampled
    params = SamplingParams(seed=7, **SAMPLED)
    assert generate(model, [prompt], sampling=params)[0, len(prompt):].tolist() == by_seed
    assert generate_batch(model, [prompt], sampling=params)[0].tokens == by_seed
    assert generate_batch(model, [prompt], seed=7, **SAMPLED)[0].tokens == by_seed
    with_generator = generate(model, [prompt], generator=torch.Generator().manual_seed(7), **SAMPLED)
    assert generate_batch(model, [prompt], generator=torch.Generator().manual_seed(7), **SAMPLED)[0].tokens \
        == with_generator[0, len(prompt):].tolist() == by_seed


def test_a_seeded_request_samples_the_same_whatever_runs_beside_it(model):
    prompt = [5, 17, 42, 7, 99]
    alone = generate(model, [prompt], seed=7, **SAMPLED)[0, len(prompt):].tolist()
    batcher = ContinuousBatcher(model, kv_memory=1 << 20, generator=torch.Generator().manual_seed(0), **SAMPLED)
    others = [batcher.add_request(p) for p in ([1, 2, 3], [9] * 12, [4])]
    seeded = batcher.add_request(prompt, seed=7)
    more = batcher.add_request([8, 8], sampling=SamplingParams(max_new_tokens=2))  # greedy, its own params
    results = {r.request_id: r.tokens for r in batcher}
    assert results[seeded] == alone
    assert [len(results[i]) for i in others] == [8, 8, 8] and len(results[more]) == 2


# -- statistics belong to the call --------------------------------------------------------

def test_stats_are_per_call_even_when_calls_overlap_in_threads(model):
    jobs = [([[1, 2, 3]], 2), ([[4] * 9, [5] * 3, [6]], 7)]
    alone = [generate_batch(model, p, max_new_tokens=n) for p, n in jobs]
    assert alone[0].stats["steps"] != alone[1].stats["steps"]
    assert not hasattr(generate_batch, "last_stats")

    both_inside, seen = threading.Barrier(2), threading.local()

    def wait_for_the_other_call(module, args):
        if not getattr(seen, "waited", False):  # each call's first forward waits: both are in flight
            seen.waited = True
            both_inside.wait(timeout=60)

    results = [None, None]

    def worker(i):
        prompts, n = jobs[i]
        results[i] = generate_batch(model, prompts, max_new_tokens=n)

    handle = model.register_forward_pre_hook(wait_for_the_other_call)
    try:
        run_in_threads(worker, 2)
    finally:
        handle.remove()
    assert [r.stats for r in results] == [r.stats for r in alone]
    assert [[t.tokens for t in r] for r in results] == [[t.tokens for t in r] for r in alone]
    assert isinstance(results[0], list) and results[0] == list(alone[0])


@pytest.mark.parametrize("vocab", [49152, 128256, 151936, 262144, 32001, 1000])
def test_the_span_argmax_gives_torchs_index_for_ties_nans_and_infinities(vocab):
    """argmax_rows scans a span at a time; torch.argmax is the oracle (32001 and 1000 fall back to it)."""
    g = torch.Generator().manual_seed(vocab)
    scores = torch.randn(7, vocab, generator=g)
    scores[1, vocab // 3] = scores[1, vocab - 2] = 50.0  # a tie: the first wins
    scores[2] = float("-inf")  # all equal: index 0
    scores[3, vocab // 2] = float("nan")
    scores[3, vocab // 5] = float("nan")  # the first NaN wins, as in torch
    scores[4, vocab - 1] = 1e30  # the last position
    scores[5] = scores[5].round()  # many ties at the maximum
    scores[6, 0] = 40.0
    assert argmax_rows(scores).tolist() == scores.argmax(-1).tolist()
    assert argmax_rows(scores.bfloat16()).tolist() == scores.bfloat16().argmax(-1).tolist()
