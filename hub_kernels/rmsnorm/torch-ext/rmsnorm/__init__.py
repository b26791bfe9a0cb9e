"""RMSNorm: Triton forward and backward, PyTorch reference elsewhere."""

from . import layers
from ._ops import reference_rms_norm, rms_norm, uses_triton

__all__ = ["layers", "reference_rms_norm", "rms_norm", "uses_triton"]
