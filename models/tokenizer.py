"""A thin tokenizer over the `tokenizers` library: batching, padding, chat templates.

Built from a checkpoint's `tokenizer.json` or from a GGUF file's vocabulary (see
`models/gguf.py`). Returns torch tensors ready for the models in this package.

>>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers
>>> backend = Backend(models.WordLevel({"[PAD]": 0, "hi": 1, "there": 2}, unk_token="[PAD]"))
>>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
>>> tok = Tokenizer(backend, pad_token_id=0)
>>> tok(["hi there", "hi"])["input_ids"].tolist()
[[1, 2], [1, 0]]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend

from kernelhub.declare.errors import CheckpointError


class Tokenizer:
    """Encode text to padded tensors and decode ids back; applies a Jinja chat template if given."""

    def __init__(self, backend: Backend, *, pad_token_id: int = 0, padding_side: str = "right",
                 bos_token: str | None = None, eos_token: str | None = None, eos_token_id: int | None = None,
                 chat_template: str | None = None, max_length: int | None = None):
        self.backend = backend
        self.pad_token_id, self.padding_side = pad_token_id, padding_side
        self.bos_token, self.eos_token, self.eos_token_id = bos_token, eos_token, eos_token_id
        self.chat_template, self.max_length = chat_template, max_length
        if max_length:
            backend.enable_truncation(max_length)  # keeps special tokens such as [SEP] at the end

    @classmethod
    def from_file(cls, path, **kwargs) -> "Tokenizer":
        """Load `tokenizer.json` from a checkpoint directory (with `tokenizer_config.json` if present).

        Special tokens, the chat template and `model_max_length` come from the config;
        keyword arguments override them.
        """
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no tokenizer at {path}: expected tokenizer.json")
        try:
            backend = Backend.from_file(str(file))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
            raise CheckpointError(f"cannot read tokenizer {file}: {e}") from None
        backend.no_padding()
        backend.no_truncation()
        config_file = file.with_name("tokenizer_config.json")
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        eos = config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        max_length = config.get("model_max_length")
        options = {
            "pad_token_id": config.get("pad_token_id", backend.token_to_id(pad) if pad else 0) or 0,
            "bos_token": config.get("bos_token"), "eos_token": eos,
            "eos_token_id": config.get("eos_token_id", backend.token_to_id(eos) if eos else None),
            "chat_template": config.get("chat_template"),
            "max_length": max_length if isinstance(max_length, int) and max_length < 1_000_000 else None,
        }
        return cls(backend, **{**options, **kwargs})

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, texts, add_special_tokens: bool = True) -> dict:
        """{"input_ids", "attention_mask"}: [B, S] long tensors, padded on `padding_side`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encoded = [self.encode(t, add_special_tokens) for t in texts]
        width = max(map(len, encoded))
        ids = torch.full((len(texts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for row, seq in enumerate(encoded):
            cols = slice(width - len(seq), width) if self.padding_side == "left" else slice(0, len(seq))
            ids[row, cols] = torch.tensor(seq, dtype=torch.long)
            mask[row, cols] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat `messages` ([{"role", "content"}]) with the model's template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        import jinja2

        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")
