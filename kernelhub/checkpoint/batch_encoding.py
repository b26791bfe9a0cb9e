"""`BatchEncoding`: what a tokenizer call returns, a dict with attribute access, like transformers'.

>>> enc = BatchEncoding({"input_ids": [[1, 2]], "attention_mask": [[1, 1]]})
>>> enc.input_ids, enc["attention_mask"], list(enc)
([[1, 2]], [[1, 1]], ['input_ids', 'attention_mask'])
"""

from __future__ import annotations

import torch


class BatchEncoding(dict):
    """A dict of model inputs (`input_ids`, `attention_mask`, ...); `model(**enc)` passes them on."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no {name!r}; keys: {', '.join(self)}") from None

    def to(self, device) -> "BatchEncoding":
        """Move the tensors to `device` (lists stay lists); returns self, as transformers does."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self
