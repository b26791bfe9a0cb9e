"""A layer kernel for `Linear` on CPU: oneDNN with a pre-packed (blocked) weight.

oneDNN's packed layout streams weights about twice as fast as the plain `[out, in]`
layout that `F.linear` reads, at every batch size, which matters most where CPU inference
is bound by reading weights (decode). The packed copy is made on first use and kept on the
module, so it costs one extra copy of each weight; unbinding frees it. Results differ from
`F.linear` by float32 rounding (accumulation order), not by more.

bfloat16 runs through oneDNN's bf16 kernels (bf16 weights, float32 accumulation) where this
CPU has them (`bf16_supported()`: avx512bw/vl/dq or avx_ne_convert, which oneDNN requires;
AVX512-BF16 or AMX make them fast); on other CPUs binding it for bfloat16 is refused with that
reason (a chain such as `["onednn", "reference"]` falls back to the reference).

    model = kernelhub.from_pretrained(path, kernels={"Linear": "onednn"})
    model = kernelhub.from_pretrained(path, dtype=torch.bfloat16, kernels={"Linear": ["onednn", "reference"]})
"""

from __future__ import annotations

import torch

CACHE = "_kernelhub_cache_onednn"  # the packed weight (unbinding drops every _kernelhub_cache_*)


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


NO_BF16 = "this CPU lacks oneDNN's bf16 kernels (they need avx512bw, avx512vl and avx512dq, or avx_ne_convert)"


def bf16_supported() -> bool:
    """Whether oneDNN runs bfloat16 matmuls on this CPU (it refuses them on plain AVX2 CPUs)."""
    return onednn_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# The dtypes oneDNN's matmul serves on this CPU, decided once, outside any graph (dynamo cannot
# trace the probe of torch.ops) and outside hot paths (the bf16 probe is an op call).
ONEDNN_DTYPES = ((torch.float32,) + ((torch.bfloat16,) if bf16_supported() else ())) if onednn_available() else ()


def weight_key(weight) -> tuple | None:
    """What a packed copy was made from: storage and version (inference tensors keep no version);
    None for a tensor without storage of its own (a wrapper subclass), which is never packed."""
    try:
        return weight.data_ptr(), 0 if weight.is_inference() else weight._version
    except RuntimeError:
        return None


def pack(weight) -> torch.Tensor:
    """oneDNN's packed copy of `weight`, labelled with the `weight_key` it was made from."""
    with torch.no_grad():
        # Packed for a small batch: the layout serves decode steps and long prefills alike.
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)
    packed.kernelhub_key = weight_key(weight)
    return packed


@torch.library.custom_op("kernelhub::onednn_packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T + b through oneDNN's `packed` copy of `weight`, or `F.linear` when the weight changed
    since it was packed. An opaque op: a compiled graph calls it as is (inductor's own lowering of
    the oneDNN op expects a weight it packed itself) and the freshness check runs at every call."""
    key = weight_key(weight)
    if key is None or getattr(packed, "kernelhub_key", None) != key:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, weight, packed, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class OneDNNLinear(torch.nn.Module):
    """forward(self, x) for a host `nn.Linear` (`weight`, `bias`), via oneDNN's packed weights.

    Eager calls (re)pack a weight that is new or changed in place. Under `torch.compile` the
    graph cannot pack (packing reads the weight's version), so it uses the copy the last eager
    call made, and `F.linear` for a weight changed since (`packed_linear` checks at every call)
    or never packed; `generate(cache="static", compile=True)` runs its prefill eagerly, which
    packs before its compiled steps run.
    """

    has_backward = False
    can_torch_compile = True
    devices = ("cpu",)
    dtypes = (torch.float32, torch.bfloat16)

    @staticmethod
    def unsupported(device, dtype) -> list[str]:
        """Why this CPU cannot serve `dtype` (checked at bind time, after devices and dtypes)."""
        return [NO_BF16] if dtype == torch.bfloat16 and not bf16_supported() else []

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if torch.compiler.is_compiling():
            packed = getattr(self, CACHE, None)
            return torch.nn.functional.linear(x, weight, bias) if packed is None else \
                packed_linear(x, weight, packed, bias)
        packed = self.__dict__.get(CACHE)
        if packed is None or packed.kernelhub_key != weight_key(weight):
            packed = self.__dict__[CACHE] = pack(weight)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias.detach() if bias is not None else None,
                                                  "none", [], "")
