"""What conformance probes a layer kernel with: seeded inputs and weights, and the tolerance per dtype.

A catalogue layer's `probe(like, dtype, device)` builds a small instance configured like the
model's module and the inputs to call it with, from these helpers, so every probe is the same
on every run and every machine.

>>> randn(2, dtype=torch.float32, device="cpu").tolist() == randn(2, dtype=torch.float32, device="cpu").tolist()
True
"""

from __future__ import annotations

import torch

# Relative to the probe output's largest magnitude. float32: about 80 units in the last place
# (kernels accumulate in other orders); bfloat16 and float16: two units in the last place at the
# output's top binade, what a kernel that rounds once more than the reference can show.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}

TOKENS, HIDDEN = 3, 64


def randn(*shape, dtype, device, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Seeded normal values, drawn on the CPU (the same on every device), then moved."""
    values = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale
    return values.to(dtype=dtype, device=device)


def with_weights(module: torch.nn.Module, dtype, device, *, mean: float = 1.0, std: float = 0.5):
    """`module` on `device`/`dtype` in eval mode, every parameter seeded random (a probe must exercise
    the weights: an all-ones norm weight would hide a kernel that ignores it)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std + mean)
    return module.to(device=device, dtype=dtype).eval()
