"""Static cache decode under torch.compile(fullgraph=True), and compiled flex."""

import logging

import pytest
import torch

import kernelhub
from kernelhub.declare.log import captured_logs
from kernelhub.backends import flex


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """A clean dynamo per test: no graphs or dynamic-shape guesses from other tests' models."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_static_cache_decode_compiles_fullgraph_and_matches_eager_generation(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    cache = model.make_cache("static", batch=1, max_len=16)
    step = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        token = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
        tokens = [token]
        for i in range(5):
            token = step(token, position_ids=torch.tensor([[5 + i]]), cache=cache).logits[:, -1:].argmax(-1)
            tokens.append(token)
    assert torch.cat(tokens, 1).tolist() == model.generate(prompt, max_new_tokens=6)[:, 5:].tolist()


def test_compiled_flex_matches_eager(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(flex, "COMPILE", True)
    compiled = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="flex")
    eager = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    prompt = torch.tensor([[7, 3, 9, 4, 1, 8, 2, 6]])  # 8 keys at head_dim 16: inductor's miscompiled CPU tail
    with torch.no_grad():
        torch.testing.assert_close(compiled(prompt).logits, eager(prompt).logits, atol=1e-5, rtol=1e-5)
    assert compiled.generate(prompt, max_new_tokens=4).tolist() == eager.generate(prompt, max_new_tokens=4).tolist()


def test_flex_feeds_inductor_inputs_its_cpu_kernel_computes_correctly():
    qkv = torch.randn(1, 8, 3, 2, 16).permute(2, 0, 3, 1, 4)  # q, k, v: views of one fused projection
    q, k, v = flex.inductor_cpu_safe(*qkv)
    assert q.shape[-1] == k.shape[-1] == flex.CPU_COMPILE_SAFE_HEAD_DIM and v.shape[-1] == 16
    assert v.storage_offset() == 0 and v.is_contiguous()
    torch.testing.assert_close(q @ k.transpose(-1, -2), qkv[0] @ qkv[1].transpose(-1, -2))  # zero columns add nothing
    wide = torch.randn(1, 2, 8, 64)
    assert all(t is wide for t in flex.inductor_cpu_safe(wide, wide, wide))  # whole buffers pass uncopied


def test_a_failing_flex_compile_falls_back_with_a_warning(tiny_checkpoint, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("C++ compile error (simulated)\nsecond line")

    monkeypatch.setattr(flex, "COMPILE", True)
    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: broken)
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="flex")
    eager = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with captured_logs("warning") as records, torch.no_grad():
        out = model(ids).logits
    (warning,) = [r.getMessage() for r in records if r.levelno == logging.WARNING]  # one line, on the logger
    assert warning.startswith("compiling flex_attention failed (RuntimeError: C++ compile error (simulated))")
    torch.testing.assert_close(out, eager(ids).logits, atol=1e-5, rtol=1e-5)
    assert flex.COMPILE is False
