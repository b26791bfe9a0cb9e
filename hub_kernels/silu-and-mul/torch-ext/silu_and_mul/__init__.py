"""silu(x[..., :d]) * x[..., d:]: Triton forward and backward, PyTorch reference elsewhere."""

from . import layers
from ._ops import reference_silu_and_mul, silu_and_mul, uses_triton

__all__ = ["layers", "reference_silu_and_mul", "silu_and_mul", "uses_triton"]
