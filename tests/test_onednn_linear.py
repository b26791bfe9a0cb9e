"""The built-in oneDNN Linear kernel: a layer kernel bound like any other."""

import pytest
import torch

import kernelhub
from kernelhub.backends.onednn_linear import CACHE, bf16_supported


IDS = torch.tensor([[4, 8, 15, 16, 23, 42]])


def test_matches_the_reference_and_shows_in_the_plan(tiny_checkpoint):
    fast = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "onednn"})
    reference = kernelhub.from_pretrained(tiny_checkpoint)
    with torch.no_grad():
        torch.testing.assert_close(fast(IDS).logits, reference(IDS).logits, atol=1e-4, rtol=1e-4)
    assert fast.binding["lm_head"].chosen == "onednn"
    assert fast.binding["lm_head"].source == "builtin (Linear)"
    assert fast.generate(IDS, max_new_tokens=8).tolist() == reference.generate(IDS, max_new_tokens=8).tolist()


def test_packed_weight_follows_weight_updates_and_is_freed_on_unbind(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "onednn"})
    with torch.no_grad():
        before = model(IDS).logits
        model.lm_head.weight.mul_(2)  # in-place: bumps the version, the packed copy must follow
        torch.testing.assert_close(model(IDS).logits, 2 * before, atol=1e-4, rtol=1e-4)
    assert CACHE in model.lm_head.__dict__
    kernelhub.unbind(model)
    assert CACHE not in model.lm_head.__dict__


def test_refused_for_training_and_bf16_with_reasons(tiny_checkpoint):
    with pytest.raises(kernelhub.BindError, match="has_backward=False, cannot train"):
        kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "onednn"}, mode="training")
    if bf16_supported():  # oneDNN's bf16 kernels exist on this CPU: bf16 binds (tests/test_bf16_cpu.py runs it)
        model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "onednn"}, dtype="bfloat16")
        assert model.binding["lm_head"].chosen == "onednn"
    else:
        with pytest.raises(kernelhub.BindError, match="this CPU lacks oneDNN's bf16 kernels"):
            kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "onednn"}, dtype="bfloat16")
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": ["onednn", "reference"]}, mode="training")
    entry = model.binding["lm_head"]
    assert entry.chosen == "reference" and entry.rejected == (("onednn", ("has_backward=False, cannot train",)),)


def test_encoder_with_onednn_matches_reference():
    from kernelhub.testing.samples import minilm_dir

    batch = kernelhub.load_tokenizer(minilm_dir())(["A man is eating food.", "Hi"], padding=True,
                                                    return_tensors="pt")
    fast = kernelhub.from_pretrained(minilm_dir(), kernels={"Linear": "onednn"})
    reference = kernelhub.from_pretrained(minilm_dir())
    with torch.no_grad():
        torch.testing.assert_close(fast(**batch).last_hidden_state, reference(**batch).last_hidden_state,
                                   atol=1e-4, rtol=1e-4)
