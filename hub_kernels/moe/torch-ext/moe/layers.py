"""The Hugging Face `kernels` layer contract: stateless classes reading the host module."""

import torch

from ._ops import moe_experts


class Experts(torch.nn.Module):
    """Replaces the forward of a kernelhub `Experts`: reads `gate_up_proj` [E, 2I, H], `down_proj` [E, H, I],
    `gate_up_proj_bias`/`down_proj_bias` (or None), `activation`, `alpha` and `limit`."""

    has_backward = False
    can_torch_compile = True
    supports = ("bias", "swiglu_clamped")

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                           self.gate_up_proj_bias, self.down_proj_bias, self.activation, self.alpha, self.limit)
