"""The Hugging Face `kernels` layer contract: stateless classes reading the host module."""

import torch

from ._ops import layer_norm


class LayerNorm(torch.nn.Module):
    has_backward = False
    can_torch_compile = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.variance_epsilon)
