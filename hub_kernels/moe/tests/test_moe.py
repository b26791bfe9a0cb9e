"""The kernel against its PyTorch reference (Triton runs under the interpreter on CPU; keep shapes small)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
import moe  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the output's largest magnitude


def _case(experts, tokens, top_k, hidden, inter, bias, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5,
               torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5]
    if bias:
        weights += [torch.randn(experts, 2 * inter, generator=g), torch.randn(experts, hidden, generator=g)]
    x = torch.randn(tokens, hidden, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)]).reshape(tokens, top_k)
    w = torch.rand(tokens, top_k, generator=g)
    return [t.to(dtype) for t in (x, w, *weights)], idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "swiglu_clamped"])
@pytest.mark.parametrize("experts,tokens,top_k,bias", [(4, 5, 2, False), (6, 3, 4, True), (3, 1, 1, True)])
def test_matches_reference(experts, tokens, top_k, bias, activation, dtype):
    (x, w, *weights), idx = _case(experts, tokens, top_k, 16, 24, bias, dtype)
    weights += [None, None] if not bias else []
    got = moe.moe_experts(x, idx, w, *weights, activation=activation)
    want = moe.reference_experts(x, idx, w, *weights, activation=activation)
    scale = want.float().abs().max().clamp_min(1.0)
    assert float((got.float() - want.float()).abs().max() / scale) <= TOLERANCE[dtype]


@pytest.mark.parametrize("which", ["gate_up", "down"])
def test_one_bias_alone(which):
    (x, w, gate_up, down, gate_bias, down_bias), idx = _case(4, 3, 2, 16, 16, True, torch.float32)
    biases = (gate_bias, None) if which == "gate_up" else (None, down_bias)
    got = moe.moe_experts(x, idx, w, gate_up, down, *biases)
    torch.testing.assert_close(got, moe.reference_experts(x, idx, w, gate_up, down, *biases))
    assert not torch.allclose(got, moe.moe_experts(x, idx, w, gate_up, down))  # the one bias is applied


def test_experts_without_tokens_and_no_tokens_at_all():
    (x, w, gate_up, down), _ = _case(5, 4, 1, 16, 16, False, torch.float32)
    idx = torch.tensor([[4], [4], [0], [4]])  # experts 1..3 receive nothing
    torch.testing.assert_close(moe.moe_experts(x, idx, w, gate_up, down), moe.reference_experts(x, idx, w, gate_up,
                                                                                                  down))
    empty = moe.moe_experts(x[:0], idx[:0], w[:0], gate_up, down)
    assert empty.shape == (0, 16)


def test_align_pads_each_expert_to_the_block():
    slots, block_expert = moe.align(torch.tensor([[1, 0], [1, 2], [1, 0]]), 4, 2)
    # expert 0: slots 1, 5; expert 1: 0, 2, 4 (+ pad 6); expert 2: 3 (+ pad); expert 3: nothing
    assert slots.tolist()[:8] == [1, 5, 0, 2, 4, 6, 3, 6]
    assert block_expert.tolist()[:5] == [0, 1, 1, 2, 4]


def test_triton_is_what_runs_here():
    assert moe.uses_triton(torch.zeros(1)), "set TRITON_INTERPRET=1 to exercise the Triton kernel on CPU"


def test_compiles_whole_through_the_custom_op():
    (x, w, gate_up, down, gate_bias, down_bias), idx = _case(4, 3, 2, 16, 16, True, torch.float32)

    def fn(x, idx, w):
        return moe.moe_experts(x, idx, w, gate_up, down, gate_bias, down_bias, activation="swiglu_clamped") * 2

    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(x, idx, w), fn(x, idx, w))
