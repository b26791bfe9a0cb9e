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

from kernelhub.backends.attention_mask import AttentionMask
from kernelhub.backends.capture import capturing, require_weights
from kernelhub.backends.layer import Linear, layer
from kernelhub.backends.site import AttentionSite


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
    def from_dict(cls, d: dict) -> "BertConfig":
        act = d.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"hidden_act {act!r} is not supported; supported: 'gelu'")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"position_embedding_type {d['position_embedding_type']!r} is not supported; "
                             "supported: 'absolute'")
        fields = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        return cls(**{k: v for k, v in d.items() if k in fields}, raw=dict(d))


@layer("LayerNorm")
class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, declared swappable. `variance_epsilon` is the name Hub kernels read."""

    @property
    def variance_epsilon(self):
        return self.eps


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


@dataclasses.dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    attentions: tuple | None = None
    hidden_states: tuple | None = None


class BertModel(nn.Module):
    """BERT encoder; `forward(input_ids, attention_mask, token_type_ids)` -> `EncoderOutput`."""

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
            require_weights((f"encoder.layer.{i}.attention.self.attn", layer_.attention.self.attn)
                            for i, layer_ in enumerate(self.encoder.layer))
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        kinds = ["hidden_states" if output_hidden_states else None, "attentions" if output_attentions else None]
        with capturing(self, self.capture_points, kinds) as captured:
            x = self.embeddings(input_ids, token_type_ids)
            mask = AttentionMask.build(batch=b, q_len=s, causal=False, padding=attention_mask, device=x.device)
            for layer_ in self.encoder.layer:
                x, _ = layer_(x, mask)
        attentions, hidden = captured.get("attentions"), captured.get("hidden_states")
        return EncoderOutput(x, self.pooler(x), tuple(attentions) if attentions is not None else None,
                             tuple(hidden) if hidden is not None else None)

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def save_pretrained(self, path):
        """Write config.json (with the binding request) and model.safetensors."""
        from kernelhub.models.checkpoint import save_pretrained

        save_pretrained(self, path)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average token states over real (unpadded) tokens: [B, S, H], [B, S] -> [B, H].

    >>> mean_pool(torch.ones(1, 3, 2), torch.tensor([[1, 1, 0]])).tolist()
    [[1.0, 1.0]]
    """
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
