"""The catalogue: one reference implementation per declared layer name.

A layer name is a contract: `RMSNorm` means exactly the math of `RMSNorm.forward` below, in
every model that declares it, and every kernel bound to an `RMSNorm` is checked against it
(conformance, `kernelhub.registry.conformance`). So the reference layers live here once and
model files import them; a variant whose numbers differ gets its own name (`GemmaRMSNorm`
scales by `1 + weight`, `GptOssRMSNorm` scales before the cast back) rather than sharing one.

Each class also says how to probe a kernel for it: `probe(like, dtype, device)` builds a small
instance configured like `like` (the model's own module) with seeded random weights, and the
inputs to call it with; `tolerance` is the largest error a kernel may show, per dtype, as
`max|kernel - reference| / max|reference|` on that probe.

>>> import torch
>>> norm, (x,) = RMSNorm.probe(RMSNorm(8), torch.float32, torch.device("cpu"))
>>> tuple(norm(x).shape), RMSNorm.tolerance[torch.bfloat16]
((3, 64), 0.016)
"""

from __future__ import annotations

import torch
from torch import nn

from kernelhub.declare.experts import Experts
from kernelhub.declare.ggml_blocks import random_blocks, row_bytes, torch_dequantize, type_name
from kernelhub.declare.layer import layer
from kernelhub.declare.probe import HIDDEN, TOKENS, TOLERANCE, randn, with_weights

# what a probe returns: the reference module with seeded weights, and the inputs to call it with
Probe = tuple[nn.Module, tuple[torch.Tensor, ...]]


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """The mean of `x`'s squares over its last dimension, kept: `x * x`, the values `x.pow(2)` gives.
    Not pow: on an AVX-512 CPU, torch's pow kernel slowed the products run after it by about 20%
    (measured on packed GGUF decode; x * x does not), and a decoder runs a norm before most of them.

    >>> mean_square(torch.tensor([[3.0, 4.0]]))
    tensor([[12.5000]])
    """
    return (x * x).mean(-1, keepdim=True)


@layer("RMSNorm")
class RMSNorm(nn.Module):
    """Root-mean-square norm, normalised in float32 and cast back before the scale (transformers'
    Llama, Qwen, Mistral): `weight * (x / rms(x)).to(x.dtype)`."""

    tolerance = TOLERANCE

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(mean_square(x) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    @classmethod
    def probe(cls, like: nn.Module, dtype: torch.dtype, device: torch.device | str) -> Probe:
        module = with_weights(cls(HIDDEN, like.variance_epsilon), dtype, device)
        return module, (randn(TOKENS, HIDDEN, dtype=dtype, device=device, scale=3.0),)


@layer("GptOssRMSNorm")
class GptOssRMSNorm(RMSNorm):
    """gpt-oss's RMS norm: the scale is applied in float32, then cast (`(weight * x / rms(x)).to(dtype)`).

    Not `RMSNorm`: in bfloat16 the two roundings differ on about a quarter of the elements."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps)

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(mean_square(x) + self.variance_epsilon)
        return (self.weight * x).to(dtype)


@layer("GemmaRMSNorm")
class GemmaRMSNorm(nn.Module):
    """Gemma's RMS norm: normalise in float32, scale by `(1 + weight)` in float32, then cast.

    Not `RMSNorm`: the weight is an offset from one, and the scale is applied before the cast."""

    tolerance = TOLERANCE

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps  # transformers' Gemma2RMSNorm attribute name

    def forward(self, x):
        out = x.float()
        out = out * torch.rsqrt(mean_square(out) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)

    @classmethod
    def probe(cls, like: nn.Module, dtype: torch.dtype, device: torch.device | str) -> Probe:
        module = with_weights(cls(HIDDEN, like.eps), dtype, device)
        return module, (randn(TOKENS, HIDDEN, dtype=dtype, device=device, scale=3.0),)


class _GatedActivation(nn.Module):
    tolerance = TOLERANCE

    @classmethod
    def probe(cls, like: nn.Module, dtype: torch.dtype, device: torch.device | str) -> Probe:
        return cls().to(device), (randn(TOKENS, 2 * HIDDEN, dtype=dtype, device=device, scale=2.0),)


@layer("SiLUAndMul")
class SiLUAndMul(_GatedActivation):
    """silu(x[..., :d]) * x[..., d:], the gated-MLP activation."""

    def forward(self, x):
        d = x.shape[-1] // 2
        return nn.functional.silu(x[..., :d]) * x[..., d:]


@layer("GeluTanhAndMul")
class GeluTanhAndMul(_GatedActivation):
    """gelu_tanh(x[..., :d]) * x[..., d:], Gemma's gated-MLP activation."""

    def forward(self, x):
        d = x.shape[-1] // 2
        return nn.functional.gelu(x[..., :d], approximate="tanh") * x[..., d:]


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q, k, cos, sin):
    """Rotate-half rotary embedding of q and k ([B, H, S, D]) by cos/sin ([B, S, D])."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@layer("ApplyRotary")
class ApplyRotary(nn.Module):
    """Rotary position embedding of q and k ([B, H, S, D]) by cos/sin ([B, S, D]), rotate-half style
    (gpt-oss's two-halves formula computes the same products)."""

    tolerance = TOLERANCE

    def forward(self, q, k, cos, sin):
        return apply_rope(q, k, cos, sin)

    @classmethod
    def probe(cls, like: nn.Module, dtype: torch.dtype, device: torch.device | str) -> Probe:
        heads, kv_heads, dim = 4, 2, 16
        angles = torch.arange(TOKENS)[:, None] * torch.linspace(0.1, 1.0, dim // 2)[None]
        angles = torch.cat((angles, angles), dim=-1)[None]
        cos, sin = (f(angles).to(device=device, dtype=dtype) for f in (torch.cos, torch.sin))
        return cls().to(device), (randn(1, heads, TOKENS, dim, dtype=dtype, device=device),
                                  randn(1, kv_heads, TOKENS, dim, dtype=dtype, device=device, scale=2.0), cos, sin)


@layer("LayerNorm")
class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, declared swappable. `variance_epsilon` is the name Hub kernels read."""

    tolerance = TOLERANCE

    @property
    def variance_epsilon(self):
        return self.eps

    @classmethod
    def probe(cls, like: nn.Module, dtype: torch.dtype, device: torch.device | str) -> Probe:
        module = with_weights(cls(HIDDEN, eps=like.eps, elementwise_affine=like.elementwise_affine,
                                   bias=like.bias is not None), dtype, device)
        return module, (randn(TOKENS, HIDDEN, dtype=dtype, device=device, scale=3.0),)


@layer("Linear")
class Linear(nn.Linear):
    """nn.Linear, declared swappable (for example with the oneDNN packed-weight kernel on CPU)."""

    tolerance = TOLERANCE

    @classmethod
    def probe(cls, like: nn.Module, dtype: torch.dtype, device: torch.device | str) -> Probe:
        # scaled like a trained layer's weights: outputs of order one
        module = with_weights(cls(HIDDEN, 48, bias=like.bias is not None), dtype, device, mean=0.0, std=HIDDEN ** -0.5)
        return module, (randn(TOKENS, HIDDEN, dtype=dtype, device=device),)


@layer("QuantizedLinear")
class QuantizedLinear(nn.Module):
    """A Linear whose weight stays in packed GGUF blocks: `qweight` (uint8 `[out_features,
    bytes_per_row]`) of ggml type `ggml_type` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K or Q6_K), and an
    optional float `bias`. The reference unpacks the weight to float32 and multiplies in float32,
    rounding once to `x`'s dtype; kernels (the `gguf` one) multiply by the blocks directly."""

    tolerance = {**TOLERANCE, torch.float32: 1e-5}

    def __init__(self, in_features: int, out_features: int, ggml_type: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.ggml_type = in_features, out_features, int(ggml_type)
        self.register_buffer("qweight", torch.zeros(out_features, row_bytes(self.ggml_type, in_features),
                                                    dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        weight = torch_dequantize(self.qweight, self.ggml_type, (self.out_features, self.in_features))
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), weight.to(x.device), bias).to(x.dtype)

    def kernel_plan_note(self) -> str:
        """What the binding plan shows next to this layer's kernel: its ggml type."""
        return type_name(self.ggml_type)

    def probe_variant(self) -> tuple:
        """What the probe takes from this instance (conformance verdicts are cached per variant)."""
        return (self.ggml_type, self.bias is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"ggml_type={type_name(self.ggml_type)}, bias={self.bias is not None}")

    @classmethod
    def probe(cls, like: nn.Module, dtype: torch.dtype, device: torch.device | str) -> Probe:
        in_features = 512 if like.in_features % 512 == 0 else 256
        module = cls(in_features, 48, like.ggml_type, bias=like.bias is not None)
        with torch.no_grad():
            module.qweight.copy_(random_blocks(like.ggml_type, 48, in_features, seed=1))
        module = with_weights(module, dtype, device, mean=0.0, std=0.5)
        return module, (randn(TOKENS, in_features, dtype=dtype, device=device),)


@layer("QuantizedEmbedding")
class QuantizedEmbedding(nn.Module):
    """An embedding whose table stays in packed GGUF blocks: `qweight` (uint8 `[num_embeddings,
    bytes_per_row]`) of ggml type `ggml_type`. The reference unpacks the rows the ids name to float32
    (gguf-py's values) and casts them to the model's float dtype, which the layer keeps as the dtype
    of `dtype_anchor` (an empty float buffer that `model.to(dtype)` converts); kernels (the `gguf`
    one) read the rows straight from the blocks. A tied output projection is a `QuantizedLinear`
    sharing this `qweight`, so the table is held once.

    >>> emb = QuantizedEmbedding(4, 32, 8)                    # 4 rows of 32 values, Q8_0
    >>> tuple(emb(torch.tensor([[0, 3]])).shape)
    (1, 2, 32)
    """

    tolerance = TOLERANCE

    def __init__(self, num_embeddings: int, embedding_dim: int, ggml_type: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.ggml_type = num_embeddings, embedding_dim, int(ggml_type)
        self.register_buffer("qweight", torch.zeros(num_embeddings, row_bytes(self.ggml_type, embedding_dim),
                                                    dtype=torch.uint8))
        self.register_buffer("dtype_anchor", torch.empty(0), persistent=False)

    def forward(self, input_ids):
        ids = input_ids.reshape(-1)
        rows = torch_dequantize(self.qweight.index_select(0, ids), self.ggml_type, (ids.numel(), self.embedding_dim))
        return rows.to(self.dtype_anchor.dtype).reshape(*input_ids.shape, self.embedding_dim)

    def kernel_plan_note(self) -> str:
        """What the binding plan shows next to this layer's kernel: its ggml type."""
        return type_name(self.ggml_type)

    def probe_variant(self) -> tuple:
        return (self.ggml_type,)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, ggml_type={type_name(self.ggml_type)}"

    @classmethod
    def probe(cls, like: nn.Module, dtype: torch.dtype, device: torch.device | str) -> Probe:
        dim = 512 if like.embedding_dim % 512 == 0 else 256
        module = cls(48, dim, like.ggml_type)
        with torch.no_grad():
            module.qweight.copy_(random_blocks(like.ggml_type, 48, dim, seed=1))
        ids = torch.tensor([[0, 47, 5], [5, 11, 0]], device=device)
        return module.to(device=device, dtype=dtype).eval(), (ids,)


CATALOGUE = {cls.kernel_layer_name: cls for cls in (RMSNorm, GptOssRMSNorm, GemmaRMSNorm, SiLUAndMul,
                                                     GeluTanhAndMul, ApplyRotary, LayerNorm, Linear, QuantizedLinear,
                                                     QuantizedEmbedding, Experts)}
