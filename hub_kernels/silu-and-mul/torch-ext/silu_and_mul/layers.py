"""The Hugging Face `kernels` layer contract: stateless classes reading the host module."""

import torch

from ._ops import silu_and_mul


class SiLUAndMul(torch.nn.Module):
    has_backward = True
    can_torch_compile = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
