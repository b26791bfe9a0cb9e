"""Qwen3 decoder in one file, top to bottom.

Llama's structure plus what Qwen3 changes: an RMSNorm over each head's channels of q and k
(`q_norm`, `k_norm`) before RoPE, an explicit `head_dim` (128 when absent, as transformers
defaults it), one `attention_bias` flag for q/k/v/o, and qwen2-style sliding windows
(`use_sliding_window`, `max_window_layers`, or `layer_types`). The q/k norms are the same
`RMSNorm` layer as the block norms, so a kernel bound with `kernels={"RMSNorm": ...}` serves
them too. Weight names match transformers checkpoints except that q/k/v and gate/up
projections are fused (`qkv_proj`, `gate_up_proj`), converted on load and save.

>>> import torch
>>> cfg = {"model_type": "qwen3", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "head_dim": 8,
...        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
>>> model = Qwen3ForCausalLM(cfg)
>>> model(torch.tensor([[1, 2, 3]])).logits.shape
torch.Size([1, 3, 32])
"""

from __future__ import annotations

import dataclasses

from torch import nn

from kernelhub.declare.errors import ConfigError
from kernelhub.declare.site import AttentionSite
from kernelhub.declare.config_schema import (boolean, check_dims, check_layer_count, choice, choice_list, divides,
                                            found, invalid, non_negative_int, optional_positive_int, positive_float,
                                            positive_int, probability)
from kernelhub.declare.reference_layers import ApplyRotary, Linear, RMSNorm, SiLUAndMul
from kernelhub.models.decoder import (capture_outputs, causal_lm_output, keep_logits, layer_type_masks, positions,
                                      select_cache)
from kernelhub.models.model_api import CausalLMAPI
from kernelhub.models.rope import RotaryEmbedding, rope_parameters

LAYER_TYPES = ("full_attention", "sliding_attention")


# -- configuration ---------------------------------------------------------------------

@dataclasses.dataclass
class Qwen3Config:
    """The fields of a transformers qwen3 config.json that the model uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: dict = dataclasses.field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple = ()
    attention_dropout: float = 0.0
    output_attentions: bool = False
    raw: dict = dataclasses.field(default_factory=dict)
    model_type: str = "qwen3"

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Qwen3Config":
        """Parse a transformers qwen3 config dict; a bad field raises one `ConfigError` naming it.

        >>> Qwen3Config.from_dict({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "head_dim": 4,
        ...                        "num_hidden_layers": 2, "num_attention_heads": 2, "use_sliding_window": True,
        ...                        "sliding_window": 4, "max_window_layers": 1}).layer_types
        ('full_attention', 'sliding_attention')
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the config is {found(d)}; allowed: a JSON object")
        choice(d, "model_type", ("qwen3",), source, default="qwen3")
        choice(d, "hidden_act", ("silu",), source, default="silu")
        hidden = positive_int(d, "hidden_size", source)
        layers = positive_int(d, "num_hidden_layers", source)
        heads = positive_int(d, "num_attention_heads", source)
        kv_heads = optional_positive_int(d, "num_key_value_heads", source) or heads
        divides(source, "num_key_value_heads", kv_heads, "num_attention_heads", heads)
        head_dim = positive_int(d, "head_dim", source, default=128)  # transformers' Qwen3Config default
        if head_dim % 2:  # rotary embeddings rotate pairs of channels
            raise invalid(source, "head_dim", head_dim, "an even positive int")
        # As transformers: the window exists only when use_sliding_window is true; layers from
        # max_window_layers on slide unless layer_types says which.
        window = optional_positive_int(d, "sliding_window", source)
        if not boolean(d, "use_sliding_window", source, default=False):
            window = None
        layer_types = choice_list(d, "layer_types", LAYER_TYPES, layers, "num_hidden_layers", source)
        if layer_types is None:
            first = non_negative_int(d, "max_window_layers", source, default=28)
            layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                           for i in range(layers)]
        if "sliding_attention" in layer_types and window is None:
            raise ConfigError(f"{source}: 'layer_types' has sliding_attention layers but there is no window "
                              f"(use_sliding_window is false or sliding_window is null); allowed: set both, or "
                              "only full_attention layers")
        return cls(
            vocab_size=positive_int(d, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=positive_int(d, "intermediate_size", source),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=positive_float(d, "rms_norm_eps", source, default=1e-6),
            rope=rope_parameters(d, source),
            attention_bias=boolean(d, "attention_bias", source, default=False),
            tie_word_embeddings=boolean(d, "tie_word_embeddings", source, default=False),
            sliding_window=window if "sliding_attention" in layer_types else None,
            layer_types=tuple(layer_types),
            attention_dropout=probability(d, "attention_dropout", source),
            output_attentions=boolean(d, "output_attentions", source, default=False),
            raw=dict(d),
        )

    def check_weights(self, shapes: dict, *, source: str = "config", weights: str = "the weights") -> None:
        """Check the sizes against the weights' headers (`{tensor name: shape}`) before anything is built.

        >>> cfg = Qwen3Config.from_dict({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "head_dim": 4,
        ...                              "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> cfg.check_weights({"model.layers.0.self_attn.q_norm.weight": (8,)}, source="config.json", weights="w/")
        Traceback (most recent call last):
            ...
        kernelhub.declare.errors.ConfigError: config.json: 'head_dim' is 4 but ... has shape (8,); ...
        """
        check_layer_count("num_hidden_layers", self.num_hidden_layers, shapes, "model.layers", source, weights)
        hidden, head = ("hidden_size", self.hidden_size), ("head_dim", self.head_dim)
        layer0 = "model.layers.0."
        check_dims(shapes, "model.embed_tokens.weight", [("vocab_size", self.vocab_size), hidden], source, weights)
        check_dims(shapes, layer0 + "self_attn.q_norm.weight", [head], source, weights)
        check_dims(shapes, layer0 + "self_attn.q_proj.weight",
                   [("num_attention_heads * head_dim", self.num_attention_heads * self.head_dim), hidden],
                   source, weights)
        check_dims(shapes, layer0 + "self_attn.k_proj.weight",
                   [("num_key_value_heads * head_dim", self.num_key_value_heads * self.head_dim), hidden],
                   source, weights)
        check_dims(shapes, layer0 + "mlp.gate_proj.weight", [("intermediate_size", self.intermediate_size), hidden],
                   source, weights)


# -- layers ----------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.layer_idx, d = layer_idx, cfg.head_dim
        # q, k and v in one matmul: one larger GEMM is faster than three small ones.
        self.qkv_sizes = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d)
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=cfg.attention_bias)
        # Per-head norms over head_dim channels: [B, S, H, D] in, normalised over D.
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.rotary = ApplyRotary()
        layer_type = cfg.layer_types[layer_idx]
        self.attn = AttentionSite(
            head_dim=d, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
            causal=True, sliding_window=cfg.sliding_window if layer_type == "sliding_attention" else None,
            dropout=cfg.attention_dropout, layer_type=layer_type, layer_idx=layer_idx,
            needs_weights=cfg.output_attentions,
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
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.act = SiLUAndMul()
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        attn_out, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), weights


class Qwen3Model(nn.Module):
    def __init__(self, cfg: Qwen3Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.cfg = cfg

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                output_hidden_states=False, output_attentions=False):
        with capture_outputs(self, output_hidden_states, output_attentions) as captured:
            x = self.embed_tokens(input_ids)
            cos, sin = self.rotary_emb(positions(x, cache, position_ids), x.dtype)
            masks = layer_type_masks(self.cfg.layer_types, self.cfg.sliding_window, x, attention_mask, cache)
            for layer_ in self.layers:
                x, _ = layer_(x, cos, sin, masks[layer_.self_attn.attn.layer_type], cache)
            x = self.norm(x)
        if output_hidden_states:
            captured["hidden_states"][-1] = x  # transformers' convention: the last entry is normed
        return x, captured


class Qwen3ForCausalLM(CausalLMAPI, nn.Module):
    """A causal language model; `forward` returns a `CausalLMOutput` (loss, logits, past_key_values, ...)."""

    config_class = Qwen3Config
    # Tensor parallelism (models.tensor_parallel): q/k/v split per head group (the per-head q/k norms stay
    # whole), gate/up per half, vocabulary-parallel embedding, gathered logits.
    tp_plan = {
        "model.embed_tokens": "vocab_embedding",
        "model.layers.*.self_attn.qkv_proj": "packed_colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.self_attn.q_norm": "replicated",
        "model.layers.*.self_attn.k_norm": "replicated",
        "model.layers.*.mlp.gate_up_proj": "packed_colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "model.layers.*.input_layernorm": "replicated",
        "model.layers.*.post_attention_layernorm": "replicated",
        "model.norm": "replicated",
        "lm_head": "colwise_gather",
    }

    def __init__(self, config):
        super().__init__()
        cfg = config if isinstance(config, Qwen3Config) else Qwen3Config.from_dict(config)
        self.config = cfg
        self.model = Qwen3Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.binding = None
        self.init_api(cfg)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = None, labels=None, logits_to_keep=0, output_hidden_states: bool = False,
                output_attentions: bool | None = None, cache=None):
        """Logits for `input_ids` [B, S], as transformers' `Qwen3ForCausalLM.forward`.

        The arguments are those of `LlamaForCausalLM.forward`: `labels` adds `loss`,
        `past_key_values` (or `cache`) is a kernelhub cache from `make_cache`, `logits_to_keep`
        limits the vocabulary projection to the last N positions (or given positions).

        >>> model = Qwen3ForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "head_dim": 4,
        ...                           "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> import torch
        >>> out = model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]), use_cache=True)
        >>> out.loss.shape, out.past_key_values.get_seq_length()
        (torch.Size([]), 3)
        """
        cache = select_cache(self, past_key_values, cache, use_cache)
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        hidden, captured = self.model(input_ids, attention_mask, position_ids, cache,
                                      output_hidden_states, output_attentions)
        logits = self.lm_head(keep_logits(hidden, logits_to_keep))
        return causal_lm_output(logits, labels, cache, use_cache, captured)

    # -- checkpoint layout: transformers keeps q/k/v and gate/up separate; we hold them fused,
    # converted on load and save (`models.checkpoint`) so files stay interchangeable.

    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
