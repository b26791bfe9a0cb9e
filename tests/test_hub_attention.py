"""Attention kernels from the Hub: declared in kernelhub.json, or flash-style by API."""

import pytest
import torch

import kernelhub
from kernelhub.declare.attention_mask import AttentionMask
from tests.unchanged import registry_snapshot

ORG = "kernelhub-test"


def test_declared_attention_function_serves_every_site_and_matches_sdpa(hub, tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    before = registry_snapshot()
    plan = kernelhub.bind(model, f"{ORG}/attention@v1")  # default_attention from kernelhub.json
    assert registry_snapshot() == before, "a Hub backend must not be added to the registry"
    assert plan.chosen() == {f"{ORG}/attention@v1"}
    assert {e.source for e in plan.entries if e.kind == "attention"} == \
        {f"hub {ORG}/attention@{hub.commits['attention']}:chunked_attention"}
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[1, 2:], reference[1, 2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0], reference[0], atol=1e-5, rtol=1e-5)


def test_declared_capabilities_are_checked_like_a_registered_backend(hub, tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, dtype="float16")
    with pytest.raises(kernelhub.BindError, match="supports dtypes float32, bfloat16, not float16"):
        kernelhub.bind(model, f"{ORG}/attention@v1:chunked_attention")
    plan = kernelhub.bind(model, [f"{ORG}/attention@v1", "sdpa"])
    assert plan.chosen() >= {"sdpa"}


def test_flash_style_repo_is_recognised_and_matches_eager_with_padding(hub, tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager", dtype="bfloat16")
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.tensor([[1] * 9, [0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits.float()
    plan = kernelhub.bind(model, f"{ORG}/flash-double@v1")
    assert {e.source for e in plan.entries if e.kind == "attention"} == \
        {f"hub {ORG}/flash-double@{hub.commits['flash-double']}:flash_attn_varlen_func"}
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(out[0], reference[0], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out[1, 3:], reference[1, 3:], atol=2e-2, rtol=2e-2)
    fp32 = kernelhub.from_pretrained(tiny_checkpoint)
    with pytest.raises(kernelhub.BindError, match="not float32"):  # flash-style: fp16/bf16 only, never silently
        kernelhub.bind(fp32, f"{ORG}/flash-double@v1")


def test_varlen_mask_packs_real_tokens_and_refuses_what_it_cannot_express():
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    varlen = AttentionMask.build(batch=2, q_len=4, padding=padding, sliding_window=2).materialize("varlen")
    assert varlen.cu_seqlens_q.tolist() == [0, 3, 7] and varlen.window == (1, 0)
    assert varlen.q_index.tolist() == [1, 2, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="holes"):
        AttentionMask.build(batch=1, q_len=4, padding=torch.tensor([[1, 0, 1, 1]])).materialize("varlen")
    with pytest.raises(ValueError, match="chunked attention"):
        AttentionMask.build(batch=1, q_len=4, chunk_size=2).materialize("varlen")


def test_attention_repo_without_a_declaration_is_a_clear_error(hub, tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    with pytest.raises(kernelhub.KernelhubError, match="name the attention function"):
        kernelhub.bind(model, f"{ORG}/rmsnorm@v1")
    with pytest.raises(kernelhub.KernelhubError, match="has no function 'nope'"):
        kernelhub.bind(model, f"{ORG}/attention@v1:nope")
