"""The Hugging Face `kernels` layer contract: stateless classes reading the host module."""

import torch

from ._ops import apply_rotary


class ApplyRotary(torch.nn.Module):
    has_backward = False
    can_torch_compile = True

    def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rotary(q, k, cos, sin)
