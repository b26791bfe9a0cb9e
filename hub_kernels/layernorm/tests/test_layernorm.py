"""The kernel against its PyTorch reference (interpreter on CPU)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
import layernorm  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # bf16: one ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(dtype, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, dtype=dtype) * 3 + 1
    w = (torch.rand(48) + 0.5).to(dtype)
    b = torch.randn(48).to(dtype) if bias else None
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(layernorm.layer_norm(x, w, b, 1e-12), layernorm.reference_layer_norm(x, w, b, 1e-12),
                               atol=tol, rtol=tol)
