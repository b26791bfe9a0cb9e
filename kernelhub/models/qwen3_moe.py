"""Qwen3-MoE decoder in one file, top to bottom.

Qwen3's attention (per-head q/k `RMSNorm` before RoPE, `attention_bias` on q/k/v/o) with a
sparse mixture-of-experts block on the layers transformers picks: every `decoder_sparse_step`-th
layer that is not in `mlp_only_layers` (a dense gated MLP elsewhere). The router stays here
(`mlp.gate`, softmax in float32, top-k, optional `norm_topk_prob` renormalisation); the expert
computation is the declared `Experts` layer, so `kernels={"Experts": "grouped_mm"}` (or any
Experts kernel) binds it. Sliding windows apply to every layer when `use_sliding_window` is
true, as in transformers. Checkpoints keep transformers' per-expert tensors
(`mlp.experts.{e}.gate_proj.weight`, ...); the model holds them stacked, and q/k/v and dense
gate/up fused, converted on load and save.

>>> cfg = {"model_type": "qwen3_moe", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
...        "num_hidden_layers": 2, "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
...        "moe_intermediate_size": 8, "mlp_only_layers": [0]}
>>> model = Qwen3MoeForCausalLM(cfg)
>>> [type(layer_.mlp).__name__ for layer_ in model.model.layers]
['MLP', 'SparseMoeBlock']
>>> model(torch.tensor([[1, 2, 3]])).logits.shape
torch.Size([1, 3, 32])
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kernelhub.declare.errors import ConfigError
from kernelhub.declare.experts import Experts, fuse_per_expert, split_per_expert
from kernelhub.declare.site import AttentionSite
from kernelhub.declare.fused import join_fused, split_fused
from kernelhub.declare.config_schema import (boolean, check_dims, check_layer_count, choice, divides, found,
                                            invalid, non_negative_int, optional_positive_int, positive_float,
                                            positive_int, probability)
from kernelhub.declare.reference_layers import ApplyRotary, Linear, RMSNorm, SiLUAndMul
from kernelhub.models.decoder import (capture_outputs, causal_lm_output, keep_logits, layer_type_masks,
                                      moe_causal_lm_output, positions, router_options, select_cache)
from kernelhub.models.model_api import CausalLMAPI
from kernelhub.models.rope import RotaryEmbedding, rope_parameters


# -- configuration ---------------------------------------------------------------------

@dataclasses.dataclass
class Qwen3MoeConfig:
    """The fields of a transformers qwen3_moe config.json that the model uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    sparse_layers: tuple = ()  # per layer: True for a sparse MoE block, False for a dense MLP
    norm_topk_prob: bool = False
    rms_norm_eps: float = 1e-6
    rope: dict = dataclasses.field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple = ()
    attention_dropout: float = 0.0
    output_attentions: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    raw: dict = dataclasses.field(default_factory=dict)
    model_type: str = "qwen3_moe"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Qwen3MoeConfig":
        """Parse a transformers qwen3_moe config dict (defaults as transformers'); a bad field raises one
        `ConfigError` naming it.

        >>> Qwen3MoeConfig.from_dict({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        ...     "num_hidden_layers": 4, "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 5})
        Traceback (most recent call last):
            ...
        kernelhub.declare.errors.ConfigError: config: 'num_experts_per_tok' is 5 (int); allowed: 1..num_experts (4)
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the config is {found(d)}; allowed: a JSON object")
        choice(d, "model_type", ("qwen3_moe",), source, default="qwen3_moe")
        choice(d, "hidden_act", ("silu",), source, default="silu")
        hidden = positive_int(d, "hidden_size", source)
        layers = positive_int(d, "num_hidden_layers", source)
        heads = positive_int(d, "num_attention_heads", source)
        kv_heads = optional_positive_int(d, "num_key_value_heads", source) or heads
        divides(source, "num_key_value_heads", kv_heads, "num_attention_heads", heads)
        head_dim = optional_positive_int(d, "head_dim", source)
        if head_dim is None:  # transformers: getattr(config, "head_dim", hidden_size // num_attention_heads)
            divides(source, "num_attention_heads", heads, "hidden_size", hidden)
            head_dim = hidden // heads
        if head_dim % 2:  # rotary embeddings rotate pairs of channels
            raise invalid(source, "head_dim", head_dim, "an even positive int")
        # transformers writes num_experts as "num_local_experts" (its attribute_map); Hub configs say num_experts
        key = "num_experts" if "num_experts" in d else "num_local_experts"
        experts = non_negative_int(d, key, source, default=128)
        top_k = positive_int(d, "num_experts_per_tok", source, default=8)
        if experts and top_k > experts:
            raise invalid(source, "num_experts_per_tok", top_k, f"1..num_experts ({experts})")
        step = positive_int(d, "decoder_sparse_step", source, default=1)
        dense = layer_indices(d, "mlp_only_layers", layers, source)
        window = optional_positive_int(d, "sliding_window", source)
        if not boolean(d, "use_sliding_window", source, default=False):
            window = None
        router_logits, aux_coef = router_options(d, source)
        return cls(
            vocab_size=positive_int(d, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=positive_int(d, "intermediate_size", source),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            num_experts=experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=positive_int(d, "moe_intermediate_size", source, default=768),
            # transformers' rule, Qwen3MoeDecoderLayer.__init__
            sparse_layers=tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers)),
            norm_topk_prob=boolean(d, "norm_topk_prob", source, default=False),
            rms_norm_eps=positive_float(d, "rms_norm_eps", source, default=1e-6),
            rope=rope_parameters(d, source),
            attention_bias=boolean(d, "attention_bias", source, default=False),
            tie_word_embeddings=boolean(d, "tie_word_embeddings", source, default=False),
            sliding_window=window,
            layer_types=("sliding_attention" if window else "full_attention",) * layers,
            attention_dropout=probability(d, "attention_dropout", source),
            output_attentions=boolean(d, "output_attentions", source, default=False),
            output_router_logits=router_logits,
            router_aux_loss_coef=aux_coef,
            raw=dict(d),
        )

    def check_weights(self, shapes: dict, *, source: str = "config", weights: str = "the weights") -> None:
        """Check the sizes against the weights' headers (`{tensor name: shape}`) before anything is built."""
        check_layer_count("num_hidden_layers", self.num_hidden_layers, shapes, "model.layers", source, weights)
        hidden = ("hidden_size", self.hidden_size)
        check_dims(shapes, "model.embed_tokens.weight", [("vocab_size", self.vocab_size), hidden], source, weights)
        check_dims(shapes, "model.layers.0.self_attn.q_norm.weight", [("head_dim", self.head_dim)], source, weights)
        for i, sparse in enumerate(self.sparse_layers):
            mlp = f"model.layers.{i}.mlp."
            if not sparse:
                check_dims(shapes, mlp + "gate_proj.weight", [("intermediate_size", self.intermediate_size), hidden],
                           source, weights)
                continue
            check_dims(shapes, mlp + "gate.weight", [("num_experts", self.num_experts), hidden], source, weights)
            check_dims(shapes, mlp + "experts.0.gate_proj.weight",
                       [("moe_intermediate_size", self.moe_intermediate_size), hidden], source, weights)


def layer_indices(d: dict, key: str, layers: int, source: str) -> set:
    """`d[key]` as a set of layer indices (a list of ints in 0..layers-1; absent or null: none)."""
    value = d.get(key) or []
    allowed = f"a list of layer indices 0..{layers - 1}"
    if not isinstance(value, list):
        raise invalid(source, key, value, allowed)
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < layers:
            raise invalid(source, f"{key}[{i}]", item, allowed)
    return set(value)


# -- layers ----------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, d = layer_idx, cfg.head_dim
        # q, k and v in one matmul: one larger GEMM is faster than three small ones.
        self.qkv_sizes = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d)
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)  # per head, over head_dim channels
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rotary = ApplyRotary()
        self.attn = AttentionSite(
            head_dim=d, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, causal=True,
            sliding_window=cfg.sliding_window, dropout=cfg.attention_dropout, layer_type=cfg.layer_types[layer_idx],
            layer_idx=layer_idx, needs_weights=cfg.output_attentions,
        )

    def forward(self, x, cos, sin, mask, cache):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, -1, self.attn.head_dim) for t in self.qkv_proj(x).split(self.qkv_sizes, dim=-1))
        q, k, v = self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), v.transpose(1, 2)
        q, k = self.rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, weights = self.attn(q, k, v, mask)
        return self.o_proj(out.reshape(b, s, -1)), weights


class MLP(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.act = SiLUAndMul()
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """The router (`gate`) picks `num_experts_per_tok` experts per token; `experts` runs them."""

    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)

    def route(self, x):
        """[T, H] -> (router logits [T, E], routing weights [T, K] in x's dtype, expert indices [T, K]).

        transformers' Qwen3MoeTopKRouter, operation for operation: softmax in float32, top-k,
        renormalise the k weights when `norm_topk_prob`, then cast back."""
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), indices

    def forward(self, x, router_logits: list | None = None):
        """`router_logits`, when a list, gets this block's router logits [T, E] (output_router_logits)."""
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        logits, weights, indices = self.route(flat)
        if router_logits is not None:
            router_logits.append(logits)
        return self.experts(flat, indices, weights).view(b, s, h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoeBlock(cfg) if cfg.sparse_layers[layer_idx] else MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, router_logits: list | None = None):
        attn_out, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + attn_out
        h = self.post_attention_layernorm(x)
        sparse = router_logits is not None and isinstance(self.mlp, SparseMoeBlock)
        return x + (self.mlp(h, router_logits) if sparse else self.mlp(h)), weights


class Qwen3MoeModel(nn.Module):
    def __init__(self, cfg: Qwen3MoeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.cfg = cfg

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                output_hidden_states=False, output_attentions=False, router_logits: list | None = None):
        with capture_outputs(self, output_hidden_states, output_attentions) as captured:
            x = self.embed_tokens(input_ids)
            cos, sin = self.rotary_emb(positions(x, cache, position_ids), x.dtype)
            masks = layer_type_masks(self.cfg.layer_types, self.cfg.sliding_window, x, attention_mask, cache)
            for layer_ in self.layers:
                x, _ = layer_(x, cos, sin, masks[layer_.self_attn.attn.layer_type], cache, router_logits)
            x = self.norm(x)
        if output_hidden_states:
            captured["hidden_states"][-1] = x  # transformers' convention: the last entry is normed
        return x, captured


class Qwen3MoeForCausalLM(CausalLMAPI, nn.Module):
    """A causal language model; `forward` returns a `MoeCausalLMOutput` (loss, aux_loss, logits, ...)."""

    config_class = Qwen3MoeConfig
    # Tensor parallelism (models.tensor_parallel): as Qwen3, and tensor-parallel experts: every rank holds
    # all experts, each split along moe_intermediate_size (gate/up per half, down by columns); the router
    # is whole on every rank. Dense layers' keys match only dense layers.
    tp_plan = {
        "model.embed_tokens": "vocab_embedding",
        "model.layers.*.self_attn.qkv_proj": "packed_colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.self_attn.q_norm": "replicated",
        "model.layers.*.self_attn.k_norm": "replicated",
        "model.layers.*.mlp.gate_up_proj": "packed_colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "model.layers.*.mlp.gate": "replicated",
        "model.layers.*.mlp.experts": "experts",
        "model.layers.*.input_layernorm": "replicated",
        "model.layers.*.post_attention_layernorm": "replicated",
        "model.norm": "replicated",
        "lm_head": "colwise_gather",
    }

    def __init__(self, config):
        super().__init__()
        cfg = config if isinstance(config, Qwen3MoeConfig) else Qwen3MoeConfig.from_dict(config)
        self.config = cfg
        self.model = Qwen3MoeModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.binding = None
        self.init_api(cfg)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = None, labels=None, logits_to_keep=0, output_hidden_states: bool = False,
                output_attentions: bool | None = None, cache=None, output_router_logits: bool | None = None):
        """Logits for `input_ids` [B, S], as transformers' `Qwen3MoeForCausalLM.forward`; the arguments are
        those of `LlamaForCausalLM.forward`, and `output_router_logits` (default: the config's) adds each
        sparse layer's router logits and the load-balancing `aux_loss` (see `MoeCausalLMOutput`)."""
        cache = select_cache(self, past_key_values, cache, use_cache)
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        router_logits = [] if output_router_logits else None
        hidden, captured = self.model(input_ids, attention_mask, position_ids, cache,
                                      output_hidden_states, output_attentions, router_logits)
        logits = self.lm_head(keep_logits(hidden, logits_to_keep))
        cfg = self.config
        return moe_causal_lm_output(causal_lm_output(logits, labels, cache, use_cache, captured), router_logits,
                                    num_experts=cfg.num_experts, top_k=cfg.num_experts_per_tok,
                                    coef=cfg.router_aux_loss_coef, attention_mask=attention_mask)

    # -- checkpoint layout: transformers' files keep q/k/v, dense gate/up and each expert's projections
    # separate; we hold q/k/v and gate/up fused and the experts stacked (`Experts`' layout).

    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}

    def model_to_checkpoint(self, state: dict) -> dict:
        return split_per_expert(split_fused(self, state))

    def checkpoint_to_model(self, state: dict) -> dict:
        return join_fused(self, fuse_per_expert(state))
