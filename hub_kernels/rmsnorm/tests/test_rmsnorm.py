"""The kernel against its PyTorch reference, forward and backward (Triton runs under the
interpreter on CPU; keep shapes small)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
import rmsnorm  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # bf16: one ulp (2**-6 relative)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 32), (2, 5, 48)])
def test_forward_and_backward_match_reference(dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = (torch.rand(shape[-1]) + 0.5).to(dtype).requires_grad_()
    y = rmsnorm.rms_norm(x, w, 1e-6)
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = rmsnorm.reference_rms_norm(x_ref, w_ref, 1e-6)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=tol * 10, rtol=tol * 10)
    torch.testing.assert_close(w.grad, w_ref.grad, atol=tol * 10, rtol=tol * 10)


def test_triton_is_what_runs_here():
    assert rmsnorm.uses_triton(torch.zeros(1)), "set TRITON_INTERPRET=1 to exercise the Triton kernel on CPU"
