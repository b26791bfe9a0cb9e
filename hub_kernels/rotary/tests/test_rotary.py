"""The kernel against its PyTorch reference (interpreter on CPU)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
import rotary  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}  # bf16: one ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_on_transposed_views(dtype):
    torch.manual_seed(0)
    b, s, h, h_kv, d = 2, 5, 4, 2, 16
    q = torch.randn(b, s, h, d, dtype=dtype).transpose(1, 2)  # [B, H, S, D] views, as models make them
    k = torch.randn(b, s, h_kv, d, dtype=dtype).transpose(1, 2)
    angles = torch.randn(b, s, d // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1).to(dtype), torch.cat([angles.sin()] * 2, -1).to(dtype)
    tol = TOLERANCE[dtype]
    for got, want in zip(rotary.apply_rotary(q, k, cos, sin), rotary.reference_apply_rotary(q, k, cos, sin)):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
