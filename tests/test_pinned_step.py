"""A compiled generate call checks dynamo's guards on the model at its first step only
(`kernelhub.runtime.pinned_step`): its later steps run a pinned twin of the graph the full guards
picked. These tests make the later steps see every change made between calls (a hook added and
restored, another model of the same shapes), and check that the twin really runs without the
model's guards."""

import weakref

import pytest
import torch

import kernelhub
from kernelhub.runtime import pinned_step
from kernelhub.testing.samples import write_random_checkpoint

pytestmark = pytest.mark.skipif(not pinned_step.cache_entries, reason="this torch lacks the dynamo internals "
                                "pinning reads: every step keeps the full guards, which other tests cover")

IDS = torch.tensor([[3, 14, 15, 9, 2, 6]])
NEW = 6


@pytest.fixture(scope="module")
def twin_checkpoints(tmp_path_factory):
    """Two random Llama checkpoints of the same shapes and different weights."""
    paths = [tmp_path_factory.mktemp(f"twin{seed}") for seed in (0, 1)]
    for seed, path in enumerate(paths):
        write_random_checkpoint(path, seed=seed)
    return paths


def compiled(model, ids=IDS):
    return model.generate(ids, max_new_tokens=NEW, cache="static", compile=True, eos_token_id=None)[0, ids.shape[1]:]


def eager(model, ids=IDS):
    return model.generate(ids, max_new_tokens=NEW, eos_token_id=None)[0, ids.shape[1]:]


def test_later_steps_run_the_pinned_twin_without_the_models_guards(twin_checkpoints, monkeypatch):
    model = kernelhub.from_pretrained(twin_checkpoints[0], attn_implementation="sdpa")
    kept, dropped, calls = [], [], []
    real_filter, real_pinned = pinned_step.drop_model_guards, pinned_step.pinned

    def counting_filter(guards):
        keep = real_filter(guards)
        for guard, k in zip(guards, keep):
            (kept if k else dropped).append(guard.name)
        return keep

    def counting_pinned(*args):
        step = real_pinned(*args)

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
    assert len(dropped) > 5 * len(kept), (len(dropped), len(kept))
    assert all("model" in name for name in dropped), "a guard on an input was dropped"
    assert not [n for n in kept if n == "model" or n.startswith(("model.", "model["))], "a guard on the model kept"
    assert {"ids", "positions", "padding"} <= set(kept)  # the inputs' guards stay


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
