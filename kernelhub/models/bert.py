"""BERT encoder in one file, top to bottom (all-MiniLM-L6-v2 and other `model_type: bert`).

Absolute position and token-type embeddings, post-norm layers with `@layer("LayerNorm")`,
exact GELU, and bidirectional attention through an `AttentionSite` with padding carried by
the semantic mask. `mean_pool` turns token states into sentence embeddings.
Weight names match transformers' `BertModel` checkpoints.

>>> cfg = {"model_type": "bert", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64,
...        "num_hidden_layers": 1, "num_attention_heads": 2}
>>> out = BertModel(cfg)(torch.tensor([[1, 2, 3]]))
>>> out.last_hidden_state.shape
torch.Size([1, 3, 32])
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from kernelhub.declare.attention_mask import AttentionMask
from kernelhub.declare.capture import capturing, require_weights
from kernelhub.declare.site import AttentionSite
from kernelhub.models.model_api import ModelAPI
from kernelhub.models.outputs import EncoderOutput
from kernelhub.declare.config_schema import (boolean, check_dims, check_layer_count, choice, divides, found,
                                            positive_float, positive_int, probability)
from kernelhub.declare.errors import ConfigError
from kernelhub.declare.reference_layers import LayerNorm, Linear


@dataclasses.dataclass
class BertConfig:
    """The fields of a transformers BERT config.json that the model uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    output_attentions: bool = False
    raw: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "BertConfig":
        """Parse a transformers BERT config dict, checking every field the model uses first.

        A bad field raises one `ConfigError` naming `source` (the config.json path when known).

        >>> BertConfig.from_dict({"vocab_size": 50, "hidden_size": 30, "intermediate_size": 64,
        ...                       "num_hidden_layers": 1, "num_attention_heads": 4}, "config.json")
        Traceback (most recent call last):
            ...
        kernelhub.declare.errors.ConfigError: config.json: 'hidden_size' is 30, not a multiple of ...
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the config is {found(d)}; allowed: a JSON object")
        choice(d, "hidden_act", ("gelu",), source, default="gelu")
        choice(d, "position_embedding_type", ("absolute",), source, default="absolute")
        hidden = positive_int(d, "hidden_size", source)
        heads = positive_int(d, "num_attention_heads", source)
        divides(source, "num_attention_heads", heads, "hidden_size", hidden)
        return cls(
            vocab_size=positive_int(d, "vocab_size", source),
            hidden_size=hidden,
            intermediate_size=positive_int(d, "intermediate_size", source),
            num_hidden_layers=positive_int(d, "num_hidden_layers", source),
            num_attention_heads=heads,
            max_position_embeddings=positive_int(d, "max_position_embeddings", source, default=512),
            type_vocab_size=positive_int(d, "type_vocab_size", source, default=2),
            layer_norm_eps=positive_float(d, "layer_norm_eps", source, default=1e-12),
            hidden_dropout_prob=probability(d, "hidden_dropout_prob", source),
            attention_probs_dropout_prob=probability(d, "attention_probs_dropout_prob", source),
            output_attentions=boolean(d, "output_attentions", source, default=False),
            raw=dict(d),
        )

    def check_weights(self, shapes: dict, *, source: str = "config", weights: str = "the weights") -> None:
        """Check the sizes against the weights' headers (`{tensor name: shape}`) before anything is built."""
        check_layer_count("num_hidden_layers", self.num_hidden_layers, shapes, "encoder.layer", source, weights)
        hidden = ("hidden_size", self.hidden_size)
        for tensor, key, value in (("word_embeddings", "vocab_size", self.vocab_size),
                                   ("position_embeddings", "max_position_embeddings", self.max_position_embeddings),
                                   ("token_type_embeddings", "type_vocab_size", self.type_vocab_size)):
            check_dims(shapes, f"embeddings.{tensor}.weight", [(key, value), hidden], source, weights)
        check_dims(shapes, "encoder.layer.0.intermediate.dense.weight",
                   [("intermediate_size", self.intermediate_size), hidden], source, weights)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
            self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig, layer_idx: int):
        super().__init__()
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = Linear(cfg.hidden_size, cfg.hidden_size)
        self.attn = AttentionSite(head_dim=head_dim, num_heads=cfg.num_attention_heads, causal=False,
                                  dropout=cfg.attention_probs_dropout_prob, layer_idx=layer_idx,
                                  needs_weights=cfg.output_attentions)

    def forward(self, x, mask):
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, -1, self.attn.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        out, weights = self.attn(q, k, v, mask)
        return out.reshape(b, s, -1), weights


class BertDenseNorm(nn.Module):
    """dense -> dropout -> LayerNorm(residual + x): BERT's post-norm block output."""

    def __init__(self, cfg: BertConfig, in_features: int):
        super().__init__()
        self.dense = Linear(in_features, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig, layer_idx: int):
        super().__init__()
        self.self = BertSelfAttention(cfg, layer_idx)
        self.output = BertDenseNorm(cfg, cfg.hidden_size)

    def forward(self, x, mask):
        out, weights = self.self(x, mask)
        return self.output(out, x), weights


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return nn.functional.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, layer_idx: int):
        super().__init__()
        self.attention = BertAttention(cfg, layer_idx)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertDenseNorm(cfg, cfg.intermediate_size)

    def forward(self, x, mask):
        x, weights = self.attention(x, mask)
        return self.output(self.intermediate(x), x), weights


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        return torch.tanh(self.dense(x[:, 0]))


class BertModel(ModelAPI, nn.Module):
    """BERT encoder; `forward(input_ids, attention_mask, token_type_ids)` -> `EncoderOutput`
    (`last_hidden_state`, `pooler_output`, ...; also `out[0]`, `out["pooler_output"]`)."""

    config_class = BertConfig
    # Old transformers checkpoints store this buffer; it is recomputed, never read.
    checkpoint_keys_to_ignore = ("embeddings.position_ids",)

    def __init__(self, config):
        super().__init__()
        cfg = config if isinstance(config, BertConfig) else BertConfig.from_dict(config)
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)
        self.binding = None
        self.init_api(cfg)

    def capture_points(self):
        """Where outputs come from: embeddings and each layer (hidden states), each site (weights)."""
        return {"hidden_states": [self.embeddings, *self.encoder.layer],
                "attentions": [layer_.attention.self.attn for layer_ in self.encoder.layer]}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, output_hidden_states=False,
                output_attentions=None):
        b, s = input_ids.shape
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_attentions:
            require_weights(self)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        kinds = ["hidden_states" if output_hidden_states else None, "attentions" if output_attentions else None]
        with capturing(self, self.capture_points, kinds) as captured:
            x = self.embeddings(input_ids, token_type_ids)
            mask = AttentionMask.build(batch=b, q_len=s, causal=False, padding=attention_mask, device=x.device)
            for layer_ in self.encoder.layer:
                x, _ = layer_(x, mask)
        attentions, hidden = captured.get("attentions"), captured.get("hidden_states")
        return EncoderOutput(last_hidden_state=x, pooler_output=self.pooler(x),
                             hidden_states=tuple(hidden) if hidden is not None else None,
                             attentions=tuple(attentions) if attentions is not None else None)

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token states over real (unpadded) tokens: [B, S, H], [B, S] -> [B, H].

    >>> mean_pool(torch.ones(1, 3, 2), torch.tensor([[1, 1, 0]])).tolist()
    [[1.0, 1.0]]
    """
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
