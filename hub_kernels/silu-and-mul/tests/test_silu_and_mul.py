"""The kernel against its PyTorch reference, forward and backward (interpreter on CPU)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
import silu_and_mul  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # bf16: one ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 64), (2, 3, 40)])
def test_forward_and_backward_match_reference(dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = silu_and_mul.silu_and_mul(x), silu_and_mul.reference_silu_and_mul(x_ref)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol * 4, rtol=tol * 4)


def test_odd_width_is_refused():
    with pytest.raises(ValueError, match="even last dimension"):
        silu_and_mul.silu_and_mul(torch.zeros(2, 3))
