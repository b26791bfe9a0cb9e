"""Rotary embedding of q and k: a Triton forward, PyTorch reference elsewhere."""

from . import layers
from ._ops import apply_rotary, reference_apply_rotary, uses_triton

__all__ = ["apply_rotary", "layers", "reference_apply_rotary", "uses_triton"]
