"""A plugin providing one attention backend and one RMSNorm kernel."""

import torch

import kernelhub
from kernelhub.backends.sdpa import sdpa_attention


def plugin_sdpa(module, q, k, v, mask, *, scaling, **kw):
    """sdpa, but always through a materialised bool mask (no is_causal shortcut)."""
    return sdpa_attention(module, q, k, v, mask, scaling=scaling, **kw)


class ScaledRMSNorm(torch.nn.Module):
    """RMSNorm whose output is doubled: easy to tell apart from the reference."""

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return 2 * self.weight * (x.float() * torch.rsqrt(var + self.variance_epsilon)).to(x.dtype)


@kernelhub.hookimpl
def kernelhub_attention_backends():
    return [kernelhub.AttentionBackend(name="plugin_sdpa", fn=plugin_sdpa, mask_format="bool",
                                       aliases=("plugin_attention",))]


@kernelhub.hookimpl
def kernelhub_layer_kernels():
    return {"RMSNorm": {"doubled": ScaledRMSNorm}}
