"""Mixture-of-experts forward: Triton routing gather/scatter and grouped GEMM, PyTorch reference elsewhere."""

from . import layers
from ._ops import align, moe_experts, reference_experts, uses_triton

__all__ = ["align", "layers", "moe_experts", "reference_experts", "uses_triton"]
