"""Model outputs shaped like transformers' `ModelOutput`: attribute, index and key access.

Fields that are None are skipped by index, key, iteration and `to_tuple()`, exactly as in
transformers, so `out[0]` is the loss when labels were given and the logits otherwise.

>>> out = CausalLMOutput(logits=torch.zeros(1, 2, 5))
>>> out.logits is out[0] is out["logits"], out.to_tuple()[0].shape, list(out.keys())
(True, torch.Size([1, 2, 5]), ['logits'])
>>> out["loss"]
Traceback (most recent call last):
    ...
KeyError: "'loss' is not set in this CausalLMOutput; set: logits"
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


class ModelOutput:
    """Base for output dataclasses: `out.x`, `out["x"]`, `out[i]`, `to_tuple()`, dict-style iteration."""

    def keys(self) -> list[str]:
        """The names of the fields that are set (not None), in declaration order."""
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple:
        """The set fields as a tuple (what `return_dict=False` gives in transformers)."""
        return tuple(self.values())

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r} is not set in this {type(self).__name__}; set: {', '.join(self.keys())}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())  # like a dict (and transformers): iterating gives the keys

    def __len__(self) -> int:
        return len(self.keys())


@dataclasses.dataclass
class CausalLMOutput(ModelOutput):
    """What a causal LM forward returns (transformers' `CausalLMOutputWithPast` field order)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclasses.dataclass
class MoeCausalLMOutput(ModelOutput):
    """What a mixture-of-experts causal LM forward returns (transformers' `MoeCausalLMOutputWithPast` field
    order). With `output_router_logits=True`: `router_logits`, one [tokens, experts] tensor per sparse layer,
    and `aux_loss`, the load-balancing loss (added to `loss`, times `router_aux_loss_coef`, when labels are
    given)."""

    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    router_logits: tuple | None = None


@dataclasses.dataclass
class EncoderOutput(ModelOutput):
    """What an encoder forward returns (transformers' `BaseModelOutputWithPooling` field order)."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@dataclasses.dataclass
class GenerateOutput(ModelOutput):
    """`generate(..., return_dict_in_generate=True)`: the sequences and, with `output_scores`,
    one [B, V] tensor of processed scores per generated step."""

    sequences: torch.Tensor | None = None
    scores: tuple | None = None
    past_key_values: Any = None
