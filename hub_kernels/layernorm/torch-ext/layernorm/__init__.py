"""LayerNorm: a Triton forward, PyTorch reference elsewhere."""

from . import layers
from ._ops import layer_norm, reference_layer_norm, uses_triton

__all__ = ["layer_norm", "layers", "reference_layer_norm", "uses_triton"]
