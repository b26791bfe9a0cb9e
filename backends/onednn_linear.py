"""A layer kernel for `Linear` on CPU: oneDNN with a pre-packed (blocked) weight.

oneDNN's packed layout streams weights about twice as fast as the plain `[out, in]`
layout that `F.linear` reads, at every batch size, which matters most where CPU inference
is bound by reading weights (decode). The packed copy is made on first use and kept on the
module, so it costs one extra copy of each weight; unbinding frees it. Results differ from
`F.linear` by float32 rounding (accumulation order), not by more.

    model = kernelhub.from_pretrained(path, kernels={"Linear": "onednn"})
"""

from __future__ import annotations

import torch

CACHE = "_kernelhub_cache_onednn"


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDNNLinear(torch.nn.Module):
    """forward(self, x) for a host `nn.Linear` (`weight`, `bias`), via oneDNN's packed weights."""

    has_backward = False
    can_torch_compile = False
    devices = ("cpu",)
    dtypes = (torch.float32,)

    def forward(self, x):
        weight = self.weight
        # Inference tensors keep no version counter; their identity is their storage.
        key = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        cached = self.__dict__.get(CACHE)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                # Packed for a small batch: the layout serves decode steps and long prefills alike.
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)
            cached = self.__dict__[CACHE] = (key, packed)
        bias = self.bias.detach() if self.bias is not None else None
        return torch.ops.mkldnn._linear_pointwise(x, cached[1], bias, "none", [], "")
