"""gpt-oss decoder in one file, top to bottom, following transformers' `modeling_gpt_oss.py`.

What sets it apart: attention sinks (a learned logit per head in each softmax's denominator,
`self_attn.sinks`, declared on the `AttentionSite` so only backends with sinks bind);
alternating sliding and full layers from `layer_types`; q/k/v/o biases; YaRN RoPE; and a
mixture-of-experts MLP: a biased router takes the top-k logits and softmaxes them, and the
declared `Experts` layer (biases, gpt-oss's clamped SwiGLU) computes the experts, so experts
kernels bind to it like any layer. The files hold experts in gpt-oss's layout (gate/up
interleaved, transposed); they are converted on load and save (`model_to_checkpoint`), as
are the fused q/k/v.

>>> cfg = {"model_type": "gpt_oss", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 8,
...        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
...        "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4}
>>> model = GptOssForCausalLM(cfg)
>>> _ = [torch.nn.init.normal_(p, std=0.02) for p in model.parameters()]
>>> model.config.layer_types, model(torch.tensor([[1, 2, 3]])).logits.shape
(('sliding_attention', 'full_attention'), torch.Size([1, 3, 32]))
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kernelhub.declare.errors import ConfigError
from kernelhub.declare.experts import Experts, from_gpt_oss_layout, to_gpt_oss_layout
from kernelhub.declare.site import AttentionSite
from kernelhub.declare.fused import join_fused, split_fused
from kernelhub.declare.config_schema import (boolean, check_dims, check_layer_count, choice, choice_list, divides,
                                            found, invalid, optional_positive_int, positive_float, positive_int,
                                            probability)
from kernelhub.declare.reference_layers import ApplyRotary, GptOssRMSNorm, Linear
from kernelhub.models.decoder import (capture_outputs, causal_lm_output, keep_logits, layer_type_masks,
                                      moe_causal_lm_output, positions, router_options, select_cache)
from kernelhub.models.model_api import CausalLMAPI
from kernelhub.models.rope import RotaryEmbedding, rope_parameters

LAYER_TYPES = ("full_attention", "sliding_attention")
# transformers' defaults when config.json has no rope_parameters (GptOssConfig.__post_init__)
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


# -- configuration ---------------------------------------------------------------------

@dataclasses.dataclass
class GptOssConfig:
    """The fields of a transformers gpt_oss config.json that the model uses (defaults: transformers')."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    layer_types: tuple
    sliding_window: int | None
    rope: dict
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    output_attentions: bool = False
    output_router_logits: bool = False
    router_aux_loss_coef: float = 0.001
    model_type: str = "gpt_oss"
    raw: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "GptOssConfig":
        """Parse a transformers gpt_oss config dict, checking every field the model uses.

        >>> GptOssConfig.from_dict({"model_type": "gpt_oss", "vocab_size": 8, "hidden_size": 8,
        ...                         "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...                         "num_local_experts": 2, "num_experts_per_tok": 3}, "config.json")
        Traceback (most recent call last):
            ...
        kernelhub.declare.errors.ConfigError: config.json: 'num_experts_per_tok' is 3 (int); allowed: ...
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the config is {found(d)}; allowed: a JSON object")
        choice(d, "model_type", ("gpt_oss",), source, default="gpt_oss")
        if d.get("quantization_config") is not None:  # the released weights are MXFP4 blocks and scales
            raise invalid(source, "quantization_config", d["quantization_config"],
                          "null: load a dequantized checkpoint (transformers: Mxfp4Config(dequantize=True), then "
                          "save_pretrained)")
        router_logits, aux_coef = router_options(d, source)
        hidden = positive_int(d, "hidden_size", source)
        layers = positive_int(d, "num_hidden_layers", source)
        heads = positive_int(d, "num_attention_heads", source)
        kv_heads = optional_positive_int(d, "num_key_value_heads", source) or heads
        divides(source, "num_key_value_heads", kv_heads, "num_attention_heads", heads)
        head_dim = optional_positive_int(d, "head_dim", source) or hidden // heads
        if head_dim % 2 or head_dim == 0:
            raise invalid(source, "head_dim", head_dim, "an even positive int")
        experts = positive_int(d, "num_local_experts", source)
        top_k = positive_int(d, "num_experts_per_tok", source)
        if top_k > experts:
            raise invalid(source, "num_experts_per_tok", top_k, f"at most num_local_experts ({experts})")
        layer_types = choice_list(d, "layer_types", LAYER_TYPES, layers, "num_hidden_layers", source)
        if layer_types is None:  # transformers' default: even layers slide, odd layers see everything
            layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        window = optional_positive_int(d, "sliding_window", source) if "sliding_window" in d else 128
        if "sliding_attention" in layer_types and window is None:
            raise invalid(source, "sliding_window", window, "a positive int (layer_types has sliding layers)")
        rope_source = {"rope_theta": 150000.0, **d}
        if not d.get("rope_parameters") and not d.get("rope_scaling"):
            rope_source["rope_parameters"] = dict(DEFAULT_ROPE)
        return cls(
            vocab_size=positive_int(d, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=positive_int(d, "intermediate_size", source),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            layer_types=tuple(layer_types),
            sliding_window=window if "sliding_attention" in layer_types else None,
            rope=rope_parameters(rope_source, source),
            swiglu_alpha=positive_float(d, "swiglu_alpha", source, default=1.702),
            swiglu_limit=positive_float(d, "swiglu_limit", source, default=7.0),
            rms_norm_eps=positive_float(d, "rms_norm_eps", source, default=1e-5),
            attention_bias=boolean(d, "attention_bias", source, default=True),
            tie_word_embeddings=boolean(d, "tie_word_embeddings", source, default=False),
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
        check_dims(shapes, "model.layers.0.mlp.router.weight", [("num_local_experts", self.num_local_experts),
                                                                 hidden], source, weights)
        check_dims(shapes, "model.layers.0.mlp.experts.down_proj",
                   [("num_local_experts", self.num_local_experts), ("intermediate_size", self.intermediate_size),
                    hidden], source, weights)


# -- layers ----------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, d = layer_idx, cfg.head_dim
        self.qkv_sizes = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d)
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.sinks = nn.Parameter(torch.empty(cfg.num_attention_heads))  # one sink logit per query head
        self.rotary = ApplyRotary()
        layer_type = cfg.layer_types[layer_idx]
        self.attn = AttentionSite(
            head_dim=d, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, causal=True,
            sliding_window=cfg.sliding_window if layer_type == "sliding_attention" else None, sinks=True,
            dropout=cfg.attention_dropout, layer_type=layer_type, layer_idx=layer_idx,
            needs_weights=cfg.output_attentions,
        )

    def forward(self, x, cos, sin, mask, cache):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, -1, self.attn.head_dim).transpose(1, 2)
                   for t in self.qkv_proj(x).split(self.qkv_sizes, dim=-1))
        q, k = self.rotary(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out, weights = self.attn(q, k, v, mask, sinks=self.sinks)
        return self.o_proj(out.reshape(b, s, -1)), weights


class Router(nn.Module):
    """Top-k of the (biased) router logits, softmaxed over those k: (logits [T, E], weights [T, K],
    indices [T, K]), as transformers' `GptOssTopKRouter`."""

    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(cfg.num_local_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.empty(cfg.num_local_experts))

    def forward(self, x):
        logits = nn.functional.linear(x, self.weight, self.bias)
        top_values, top_indices = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.softmax(top_values, dim=1, dtype=top_values.dtype), top_indices


class MoE(nn.Module):
    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size, bias=True,
                               activation="swiglu_clamped", swiglu_alpha=cfg.swiglu_alpha,
                               swiglu_limit=cfg.swiglu_limit)

    def forward(self, x, router_logits: list | None = None):
        """`router_logits`, when a list, gets this block's router logits [T, E] (output_router_logits)."""
        b, s, h = x.shape
        tokens = x.reshape(-1, h)
        logits, weights, indices = self.router(tokens)
        if router_logits is not None:
            router_logits.append(logits)
        return self.experts(tokens, indices, weights).reshape(b, s, h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GptOssConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg)

    def forward(self, x, cos, sin, mask, cache, router_logits: list | None = None):
        attn_out, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x), router_logits), weights


class GptOssModel(nn.Module):
    def __init__(self, cfg: GptOssConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = GptOssRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
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


class GptOssForCausalLM(CausalLMAPI, nn.Module):
    """A gpt-oss causal language model; `forward` returns a `MoeCausalLMOutput`."""

    config_class = GptOssConfig
    # Tensor parallelism (models.tensor_parallel): q/k/v per head group with their biases, each head's sink
    # with its q head, tensor-parallel experts (gate/up per half and down along the intermediate size; the
    # loader slices gpt-oss's interleaved file layout), the router whole on every rank.
    tp_plan = {
        "model.embed_tokens": "vocab_embedding",
        "model.layers.*.self_attn.qkv_proj": "packed_colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.self_attn": "heads",
        "model.layers.*.mlp.router": "replicated",
        "model.layers.*.mlp.experts": "experts",
        "model.layers.*.input_layernorm": "replicated",
        "model.layers.*.post_attention_layernorm": "replicated",
        "model.norm": "replicated",
        "lm_head": "colwise_gather",
    }

    def __init__(self, config):
        super().__init__()
        cfg = config if isinstance(config, GptOssConfig) else GptOssConfig.from_dict(config)
        self.config = cfg
        self.model = GptOssModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.binding = None
        self.init_api(cfg)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = None, labels=None, logits_to_keep=0, output_hidden_states: bool = False,
                output_attentions: bool | None = None, cache=None, output_router_logits: bool | None = None):
        """Logits for `input_ids` [B, S], as transformers' `GptOssForCausalLM.forward`; the arguments are
        those of `LlamaForCausalLM.forward`, and `output_router_logits` (default: the config's) adds each
        layer's router logits and the load-balancing `aux_loss` (see `MoeCausalLMOutput`)."""
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
                                    num_experts=cfg.num_local_experts, top_k=cfg.num_experts_per_tok,
                                    coef=cfg.router_aux_loss_coef, attention_mask=attention_mask)

    # -- checkpoint layout: q/k/v fused here, separate in the files; experts in the `Experts`
    # layout here, gpt-oss's (interleaved gate/up, transposed) in the files.

    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}

    def model_to_checkpoint(self, state: dict) -> dict:
        return to_gpt_oss_layout(split_fused(self, state))

    def checkpoint_to_model(self, state: dict) -> dict:
        return join_fused(self, from_gpt_oss_layout(state))
