"""Gemma 2 decoder in one file, top to bottom, following transformers' `modeling_gemma2.py`.

What sets it apart from Llama: attention-logit softcapping (declared on the `AttentionSite`,
so only backends that can softcap bind) and final-logit softcapping; alternating sliding and
full layers from `layer_types`; scores scaled by `query_pre_attn_scalar ** -0.5`; embeddings
multiplied by sqrt(hidden_size) rounded to the model dtype; four norms per layer. Gemma's norm
scales by `(1 + weight)`, so it is its own layer, `GemmaRMSNorm`: a plain `RMSNorm` kernel can
never bind to it. The MLP is gated by gelu-tanh (`GeluTanhAndMul`, kernels-community's name).
q/k/v and gate/up are fused as in `models/llama.py` and converted on load and save.

>>> cfg = {"model_type": "gemma2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
...        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
...        "sliding_window": 4}
>>> model = Gemma2ForCausalLM(cfg)
>>> model.config.layer_types, model(torch.tensor([[1, 2, 3]])).logits.shape
(('sliding_attention', 'full_attention'), torch.Size([1, 3, 32]))
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kernelhub.declare.errors import ConfigError
from kernelhub.declare.site import AttentionSite
from kernelhub.declare.config_schema import (boolean, check_dims, check_layer_count, choice, choice_list, divides,
                                            found, invalid, optional_positive_int, positive_float, positive_int,
                                            probability)
from kernelhub.declare.reference_layers import ApplyRotary, GeluTanhAndMul, GemmaRMSNorm, Linear
from kernelhub.models.decoder import (capture_outputs, causal_lm_output, keep_logits, layer_type_masks, positions,
                                      select_cache)
from kernelhub.models.model_api import CausalLMAPI
from kernelhub.models.rope import RotaryEmbedding, rope_parameters

LAYER_TYPES = ("full_attention", "sliding_attention")


# -- configuration ---------------------------------------------------------------------

def _optional_cap(d: dict, key: str, source: str, default: float) -> float | None:
    """A softcap: a number > 0, or null for none (absent: transformers' default)."""
    if key in d and d[key] is None:
        return None
    return positive_float(d, key, source, default=default)


@dataclasses.dataclass
class Gemma2Config:
    """The fields of a transformers gemma2 config.json that the model uses (defaults: transformers')."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple
    sliding_window: int | None
    query_pre_attn_scalar: float = 256
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    rms_norm_eps: float = 1e-6
    rope: dict = dataclasses.field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0
    output_attentions: bool = False
    model_type: str = "gemma2"
    raw: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Gemma2Config":
        """Parse a transformers gemma2 config dict, checking every field the model uses.

        >>> Gemma2Config.from_dict({"model_type": "gemma2", "vocab_size": 8, "hidden_size": 8,
        ...                         "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...                         "attn_logit_softcapping": -1.0}, "config.json")
        Traceback (most recent call last):
            ...
        kernelhub.declare.errors.ConfigError: config.json: 'attn_logit_softcapping' is -1.0 (float); allowed: ...
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the config is {found(d)}; allowed: a JSON object")
        choice(d, "model_type", ("gemma2",), source, default="gemma2")
        choice(d, "hidden_activation", ("gelu_pytorch_tanh",), source, default="gelu_pytorch_tanh")
        if d.get("use_bidirectional_attention"):
            raise invalid(source, "use_bidirectional_attention", d["use_bidirectional_attention"],
                          "false or null (the causal decoder)")
        hidden = positive_int(d, "hidden_size", source)
        layers = positive_int(d, "num_hidden_layers", source)
        heads = positive_int(d, "num_attention_heads", source)
        kv_heads = optional_positive_int(d, "num_key_value_heads", source) or heads
        divides(source, "num_key_value_heads", kv_heads, "num_attention_heads", heads)
        head_dim = positive_int(d, "head_dim", source, default=256)
        if head_dim % 2:  # rotary embeddings rotate pairs of channels
            raise invalid(source, "head_dim", head_dim, "an even positive int")
        layer_types = choice_list(d, "layer_types", LAYER_TYPES, layers, "num_hidden_layers", source)
        if layer_types is None:  # transformers' default: even layers slide, odd layers see everything
            layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        window = optional_positive_int(d, "sliding_window", source) if "sliding_window" in d else 4096
        if "sliding_attention" in layer_types and window is None:
            raise invalid(source, "sliding_window", window, "a positive int (layer_types has sliding layers)")
        return cls(
            model_type="gemma2",
            vocab_size=positive_int(d, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=positive_int(d, "intermediate_size", source),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            layer_types=tuple(layer_types),
            sliding_window=window if "sliding_attention" in layer_types else None,
            query_pre_attn_scalar=positive_float(d, "query_pre_attn_scalar", source, default=256),
            attn_logit_softcapping=_optional_cap(d, "attn_logit_softcapping", source, 50.0),
            final_logit_softcapping=_optional_cap(d, "final_logit_softcapping", source, 30.0),
            rms_norm_eps=positive_float(d, "rms_norm_eps", source, default=1e-6),
            rope=rope_parameters(d, source),
            attention_bias=boolean(d, "attention_bias", source, default=False),
            tie_word_embeddings=boolean(d, "tie_word_embeddings", source, default=True),
            attention_dropout=probability(d, "attention_dropout", source),
            output_attentions=boolean(d, "output_attentions", source, default=False),
            raw=dict(d),
        )

    def check_weights(self, shapes: dict, *, source: str = "config", weights: str = "the weights") -> None:
        """Check the sizes against the weights' headers (`{tensor name: shape}`) before anything is built."""
        check_layer_count("num_hidden_layers", self.num_hidden_layers, shapes, "model.layers", source, weights)
        hidden = ("hidden_size", self.hidden_size)
        check_dims(shapes, "model.embed_tokens.weight", [("vocab_size", self.vocab_size), hidden], source, weights)
        check_dims(shapes, "model.layers.0.mlp.gate_proj.weight", [("intermediate_size", self.intermediate_size),
                                                                    hidden], source, weights)
        check_dims(shapes, "model.layers.0.self_attn.q_proj.weight",
                   [("num_attention_heads * head_dim", self.num_attention_heads * self.head_dim), hidden],
                   source, weights)


# -- layers ----------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: Gemma2Config, layer_idx: int):
        super().__init__()
        self.layer_idx, d = layer_idx, cfg.head_dim
        self.qkv_sizes = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.num_key_value_heads * d)
        self.qkv_proj = Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.num_attention_heads * d, cfg.hidden_size, bias=cfg.attention_bias)
        self.rotary = ApplyRotary()
        layer_type = cfg.layer_types[layer_idx]
        self.attn = AttentionSite(
            head_dim=d, num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, causal=True,
            sliding_window=cfg.sliding_window if layer_type == "sliding_attention" else None,
            softcap=cfg.attn_logit_softcapping, scaling=cfg.query_pre_attn_scalar ** -0.5,
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
        out, weights = self.attn(q, k, v, mask)
        return self.o_proj(out.reshape(b, s, -1)), weights


class MLP(nn.Module):
    def __init__(self, cfg: Gemma2Config):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.act = GeluTanhAndMul()
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Norms around both sublayers: the sublayer's output is normed before the residual add."""

    def __init__(self, cfg: Gemma2Config, layer_idx: int):
        super().__init__()
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        attn_out, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + self.post_attention_layernorm(attn_out)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))), weights


class Gemma2Model(nn.Module):
    def __init__(self, cfg: Gemma2Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.cfg = cfg

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                output_hidden_states=False, output_attentions=False):
        with capture_outputs(self, output_hidden_states, output_attentions) as captured:
            x = self.embed_tokens(input_ids)
            # sqrt(hidden_size) rounded to the model dtype first, as transformers does (55.5, not 55.43, in bf16)
            x = x * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=x.dtype, device=x.device)
            cos, sin = self.rotary_emb(positions(x, cache, position_ids), x.dtype)
            masks = layer_type_masks(self.cfg.layer_types, self.cfg.sliding_window, x, attention_mask, cache)
            for layer_ in self.layers:
                x, _ = layer_(x, cos, sin, masks[layer_.self_attn.attn.layer_type], cache)
            x = self.norm(x)
        if output_hidden_states:
            captured["hidden_states"][-1] = x  # transformers' convention: the last entry is normed
        return x, captured


class Gemma2ForCausalLM(CausalLMAPI, nn.Module):
    """A Gemma 2 causal language model; `forward` returns a `CausalLMOutput`."""

    config_class = Gemma2Config
    # Tensor parallelism (models.tensor_parallel): as Llama; Gemma's four norms per layer are whole on every
    # rank, the tied lm_head is split with the embedding, and the final softcap applies to gathered logits.
    tp_plan = {
        "model.embed_tokens": "vocab_embedding",
        "model.layers.*.self_attn.qkv_proj": "packed_colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
        "model.layers.*.mlp.gate_up_proj": "packed_colwise",
        "model.layers.*.mlp.down_proj": "rowwise",
        "model.layers.*.input_layernorm": "replicated",
        "model.layers.*.post_attention_layernorm": "replicated",
        "model.layers.*.pre_feedforward_layernorm": "replicated",
        "model.layers.*.post_feedforward_layernorm": "replicated",
        "model.norm": "replicated",
        "lm_head": "colwise_gather",
    }

    def __init__(self, config):
        super().__init__()
        cfg = config if isinstance(config, Gemma2Config) else Gemma2Config.from_dict(config)
        self.config = cfg
        self.model = Gemma2Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.binding = None
        self.init_api(cfg)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool | None = None, labels=None, logits_to_keep=0, output_hidden_states: bool = False,
                output_attentions: bool | None = None, cache=None):
        """Logits for `input_ids` [B, S], as transformers' `Gemma2ForCausalLM.forward` (the
        arguments are those of `LlamaForCausalLM.forward`); logits are softcapped when the
        config says so.

        >>> model = Gemma2ForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "head_dim": 4,
        ...                            "num_hidden_layers": 1, "num_attention_heads": 2,
        ...                            "final_logit_softcapping": 0.5})
        >>> bool(model(torch.tensor([[1, 2, 3]])).logits.abs().max() <= 0.5)
        True
        """
        cache = select_cache(self, past_key_values, cache, use_cache)
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        hidden, captured = self.model(input_ids, attention_mask, position_ids, cache,
                                      output_hidden_states, output_attentions)
        logits = self.lm_head(keep_logits(hidden, logits_to_keep))
        cap = self.config.final_logit_softcapping
        if cap is not None:  # transformers' order of operations: divide, tanh, multiply
            logits = torch.tanh(logits / cap) * cap
        return causal_lm_output(logits, labels, cache, use_cache, captured)

    # -- checkpoint layout: q/k/v and gate/up are fused here, separate in the files.

    FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
