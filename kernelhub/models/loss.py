"""The causal language-modelling loss, computed as transformers' `ForCausalLMLoss` does.

Position t predicts token t + 1: labels are shifted left (the last position has no target),
`-100` labels are ignored, and the mean is over the counted tokens (or the sum divided by
`num_items_in_batch` when gradient accumulation gives it).

>>> logits = torch.zeros(1, 3, 4)
>>> round(causal_lm_loss(logits, torch.tensor([[1, 2, 3]])).item(), 4)  # ln(4): uniform over 4 tokens
1.3863
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Shifted cross-entropy of [B, S, V] `logits` against [B, S] `labels` (float32, like transformers)."""
    logits = logits.float()  # upcast: the loss is accurate even for half-precision logits
    labels = labels.to(logits.device)
    shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=ignore_index, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss
