"""A compiled generate call checks dynamo's guards on the model at its first step only
(`kernelhub.runtime.pinned_step`): its later steps run a pinned twin of the graph the full guards
picked, once that graph has run `PIN_AFTER_STEPS` steps under the full guards. These tests pin from
a graph's first call (`PIN_AFTER_STEPS` 0) unless they test that count; they make the later steps see
every change made between calls (an attribute edited and restored, another model of the same
shapes), and check that the twin really runs without the model's guards but for its tensors'."""

import threading
import weakref

import pytest
import torch

import kernelhub
from kernelhub.declare.errors import KernelhubError
from kernelhub.runtime import compiled_batching, compiled_decode, pinned_step
from kernelhub.testing.samples import write_random_checkpoint

pytestmark = pytest.mark.skipif(not pinned_step.cache_entries, reason="this torch lacks the dynamo internals "
                                "pinning reads: every step keeps the full guards, which other tests cover")

IDS = torch.tensor([[3, 14, 15, 9, 2, 6]])
NEW = 6


@pytest.fixture(autouse=True)
def pin_from_the_first_call(monkeypatch):
    monkeypatch.setattr(pinned_step, "PIN_AFTER_STEPS", 0)
    monkeypatch.delenv(pinned_step.PIN_AFTER_VARIABLE, raising=False)


@pytest.fixture(scope="module")
def twin_checkpoints(tmp_path_factory):
    """Two random Llama checkpoints of the same shapes and different weights."""
    paths = [tmp_path_factory.mktemp(f"twin{seed}") for seed in (0, 1)]
    for seed, path in enumerate(paths):
        write_random_checkpoint(path, seed=seed)
    return paths


def compiled(model, ids=IDS):
    return model.generate(ids, max_new_tokens=NEW, cache="static", compile=True, eos_token_id=None)[0, ids.shape[1]:]


def is_on_model(guard_name: str) -> bool:
    """Whether a guard's source starts at the step's `model` argument (its attributes, or its type's)."""
    return guard_name == "model" or guard_name.startswith(("model.", "model[")) or "(model" in guard_name


def eager(model, ids=IDS):
    return model.generate(ids, max_new_tokens=NEW, eos_token_id=None)[0, ids.shape[1]:]


def test_later_steps_run_the_pinned_twin_without_the_models_guards(twin_checkpoints, monkeypatch):
    model = kernelhub.from_pretrained(twin_checkpoints[0], attn_implementation="sdpa")
    kept, dropped, calls = [], [], []
    real_filter, real_pinned = pinned_step.drop_model_guards, pinned_step.pinned

    def counting_filter(guards):
        keep = real_filter(guards)
        for guard, k in zip(guards, keep):
            (kept if k else dropped).append((guard.name, guard.guard_type))
        return keep

    def counting_pinned(*args, **kwargs):
        step = real_pinned(*args, **kwargs)
        if step is None:
            return None

        def counted(*a):
            calls.append(1)
            return step(*a)
        return counted

    monkeypatch.setattr(pinned_step, "_pinned", weakref.WeakKeyDictionary())  # this test's twin built afresh
    monkeypatch.setattr(pinned_step, "drop_model_guards", counting_filter)
    monkeypatch.setattr(pinned_step, "pinned", counting_pinned)
    assert compiled(model).tolist() == eager(model).tolist()
    # the prefill is eager, step 1 runs under the full guards, steps 2.. the pinned twin
    assert len(calls) == NEW - 2
    on_model = [(name, kind) for name, kind in kept if is_on_model(name)]
    assert {kind for _, kind in on_model} == {"TENSOR_MATCH"}, "a guard on the model other than a tensor's kept"
    assert len(dropped) > 2 * len(on_model), (len(dropped), len(on_model))
    assert all(is_on_model(name) and kind != "TENSOR_MATCH" for name, kind in dropped), "dropped a needed guard"
    assert {"ids", "positions", "padding"} <= {name for name, _ in kept}  # the inputs' guards stay


def counting_twins(monkeypatch) -> list:
    """A fresh table of twins whose steps append to the list returned."""
    calls, real = [], compiled_decode.pinned_decode_step
    monkeypatch.setattr(pinned_step, "_pinned", weakref.WeakKeyDictionary())
    monkeypatch.setattr(pinned_step, "_served", weakref.WeakKeyDictionary())

    def counted_twin(cpp_wrapper):
        twin = real(cpp_wrapper)
        return lambda *a: calls.append(1) or twin(*a)
    monkeypatch.setattr(compiled_decode, "pinned_decode_step", counted_twin)
    return calls


def test_a_graph_gets_its_twin_once_it_has_run_pin_after_steps_steps(twin_checkpoints, monkeypatch):
    """The twin costs a second trace of the model, so short runs keep the full guards: here, once the
    graph has run 8 steps under them (counted across calls), its later steps run the twin."""
    model = kernelhub.from_pretrained(twin_checkpoints[0], attn_implementation="sdpa")
    calls = counting_twins(monkeypatch)
    monkeypatch.setattr(pinned_step, "PIN_AFTER_STEPS", 8)
    plain = eager(model).tolist()
    assert compiled(model).tolist() == plain  # 5 compiled steps, all under the full guards
    assert not calls and pinned_step.pinned_count() == 0
    assert compiled(model).tolist() == plain  # steps 6..8 under the full guards, then the twin
    assert len(calls) == 2 and pinned_step.pinned_count() == 1
    assert compiled(model).tolist() == plain  # the graph has its twin: step 1 full guards, 2..5 the twin
    assert len(calls) == 2 + NEW - 2


def test_the_default_builds_no_twin_in_a_short_run(twin_checkpoints, monkeypatch):
    model = kernelhub.from_pretrained(twin_checkpoints[0], attn_implementation="sdpa")
    calls = counting_twins(monkeypatch)
    monkeypatch.setattr(pinned_step, "PIN_AFTER_STEPS", 4096)
    for _ in range(3):
        assert compiled(model).tolist() == eager(model).tolist()
    assert not calls and pinned_step.pinned_count() == 0


def test_the_environment_sets_when_a_graph_is_pinned_and_a_bad_value_is_refused(twin_checkpoints, monkeypatch):
    model = kernelhub.from_pretrained(twin_checkpoints[0], attn_implementation="sdpa")
    calls = counting_twins(monkeypatch)
    monkeypatch.setattr(pinned_step, "PIN_AFTER_STEPS", 4096)
    monkeypatch.setenv(pinned_step.PIN_AFTER_VARIABLE, "0")
    assert compiled(model).tolist() == eager(model).tolist()
    assert len(calls) == NEW - 2  # pinned from the first call
    monkeypatch.setenv(pinned_step.PIN_AFTER_VARIABLE, "soon")
    with pytest.raises(KernelhubError, match=r"PIN_AFTER_STEPS='soon' is not a number of steps: set it to a whole"):
        compiled(model)


def test_an_attribute_edited_then_restored_between_calls_is_seen_at_every_step(twin_checkpoints):
    model = kernelhub.from_pretrained(twin_checkpoints[0], attn_implementation="sdpa")
    plain = eager(model).tolist()
    assert compiled(model).tolist() == plain
    norm = model.model.layers[0].post_attention_layernorm
    eps = norm.variance_epsilon
    norm.variance_epsilon = 30.0  # a constant the graph bakes in: only the full guards see it change
    try:
        edited = eager(model).tolist()
        assert edited != plain, "the edit changes no token: the test could not see a stale graph"
        assert compiled(model).tolist() == edited  # a later step running the first graph's twin would differ
    finally:
        norm.variance_epsilon = eps
    assert compiled(model).tolist() == plain  # back to the first graph and its twin, at every step


def test_two_models_of_the_same_shapes_each_get_their_own_tokens(twin_checkpoints):
    first, second = (kernelhub.from_pretrained(p, attn_implementation="sdpa") for p in twin_checkpoints)
    want = [eager(first).tolist(), eager(second).tolist()]
    assert want[0] != want[1], "the twins give the same tokens: the test could not see a mix-up"
    for _ in range(2):  # alternating: a pinned graph reads the weights of the model it is given
        assert [compiled(first).tolist(), compiled(second).tolist()] == want


def test_without_the_internals_every_step_keeps_the_full_guards(twin_checkpoints, monkeypatch):
    model = kernelhub.from_pretrained(twin_checkpoints[1], attn_implementation="sdpa")
    monkeypatch.setattr(pinned_step, "cache_entries", None)
    before = pinned_step.pinned_count()
    assert compiled(model).tolist() == eager(model).tolist()
    assert pinned_step.pinned_count() == before


def test_a_twin_that_fails_leaves_the_call_on_the_full_guards(twin_checkpoints, monkeypatch):
    model = kernelhub.from_pretrained(twin_checkpoints[1], attn_implementation="sdpa")
    monkeypatch.setattr(pinned_step, "_pinned", weakref.WeakKeyDictionary())

    def broken_twin(cpp_wrapper):
        def fail(*args):
            raise torch._dynamo.exc.TorchRuntimeError("a twin that cannot compile")
        return fail
    monkeypatch.setattr(compiled_decode, "pinned_decode_step", broken_twin)
    assert compiled(model).tolist() == eager(model).tolist()
    assert pinned_step.pinned_count() == 0  # forgotten: the next call that picks the graph builds another


def test_a_call_that_does_not_pin_the_model_keeps_the_full_guards(twin_checkpoints, monkeypatch):
    """The runtime's generate called directly holds no pin: a rebind could land mid-call, so no twin."""
    from kernelhub.runtime.generate import generate

    model = kernelhub.from_pretrained(twin_checkpoints[1], attn_implementation="sdpa")
    calls, real = [], pinned_step.pinned
    monkeypatch.setattr(pinned_step, "pinned", lambda *a, **k: calls.append(1) or real(*a, **k))
    tokens = generate(model, IDS, max_new_tokens=NEW, cache="static", compile=True, eos_token_id=None)
    assert tokens[0, IDS.shape[1]:].tolist() == eager(model).tolist()
    assert not calls


def test_another_threads_pin_does_not_let_this_threads_unpinned_call_skip_guards(twin_checkpoints, monkeypatch):
    """A pin held by another thread may end, and a rebind land, while this thread's call goes on."""
    from kernelhub.declare.binding import pinned
    from kernelhub.runtime.generate import generate

    model = kernelhub.from_pretrained(twin_checkpoints[1], attn_implementation="sdpa")
    calls = counting_twins(monkeypatch)
    holding, release = threading.Event(), threading.Event()

    def hold():
        with pinned(model):
            holding.set()
            release.wait(60)
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(60)
        tokens = generate(model, IDS, max_new_tokens=NEW, cache="static", compile=True, eos_token_id=None)
    finally:
        release.set()
        holder.join(60)
    assert tokens[0, IDS.shape[1]:].tolist() == eager(model).tolist()
    assert not calls


def batch_twins(monkeypatch) -> list:
    """A fresh table of twins; the compiled batching steps that run one append to the list returned."""
    calls, real = [], compiled_batching.pinned_packed_step
    monkeypatch.setattr(pinned_step, "_pinned", weakref.WeakKeyDictionary())

    def counted_twin():
        twin = real()
        return lambda *a: calls.append(1) or twin(*a)
    monkeypatch.setattr(compiled_batching, "pinned_packed_step", counted_twin)
    return calls


PROMPTS = [[3, 14, 15, 9, 2, 6], [5, 3, 5], [8, 9, 7, 9, 3, 2, 3, 8, 4]]


def test_generate_batch_runs_each_buckets_later_steps_through_its_twin(twin_checkpoints, monkeypatch):
    """Every step in one bucket (8 tokens): each call's first step runs under the full guards, the
    rest through the twin, and the tokens stay eager's."""
    model = kernelhub.from_pretrained(twin_checkpoints[0], attn_implementation="paged|sdpa")
    want = [r.tokens for r in model.generate_batch(PROMPTS, max_new_tokens=NEW, max_batch_tokens=8)]
    calls = batch_twins(monkeypatch)
    for _ in range(2):  # the second call picks its graph afresh under the full guards, then the twin again
        before = len(calls)
        results = model.generate_batch(PROMPTS, max_new_tokens=NEW, max_batch_tokens=8, compile=True)
        assert [r.tokens for r in results] == want
        assert results.stats["token_buckets"] == [8]
        assert len(calls) - before == results.stats["steps"] - 1


def test_a_batcher_runs_twins_only_within_a_pin_this_thread_holds(twin_checkpoints, monkeypatch):
    """`ContinuousBatcher` used directly holds no pin, and one kept past a pin's end no longer has it: a
    rebind could land between its steps, so they keep the full guards."""
    from kernelhub.declare.binding import pinned
    from kernelhub.runtime.batching import ContinuousBatcher

    model = kernelhub.from_pretrained(twin_checkpoints[0], attn_implementation="paged|sdpa")
    want = [r.tokens for r in model.generate_batch(PROMPTS, max_new_tokens=NEW, max_batch_tokens=8)]
    calls = batch_twins(monkeypatch)
    with ContinuousBatcher(model, kv_memory=1 << 20, max_batch_tokens=8, compile=True) as batcher:
        ids = [batcher.add_request(p, max_new_tokens=NEW) for p in PROMPTS]
        finished = batcher.step() + batcher.step()
        assert not calls  # unpinned
        with pinned(model):
            for _ in range(3):
                finished += batcher.step()
        assert len(calls) == 2  # the pin's first step picked the graph under the full guards, then the twin
        finished += list(batcher)  # past the pin
        assert len(calls) == 2 and batcher.stats["steps"] > 6
    by_id = {r.request_id: r.tokens for r in finished}
    assert [by_id[i] for i in ids] == want
