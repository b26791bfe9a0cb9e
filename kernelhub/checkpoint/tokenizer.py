"""A tokenizer over the `tokenizers` library with transformers' calling conventions.

Built from a checkpoint's `tokenizer.json` (+ `tokenizer_config.json`) or from a GGUF file's
vocabulary (see `checkpoint/gguf_tokenizer.py`); both give this class. As in transformers,
`tok(text)` returns lists (a flat list for one string) without padding; ask for
`padding=True, return_tensors="pt"` to get a padded batch of tensors.

>>> from tokenizers import Tokenizer as Backend, models, pre_tokenizers
>>> backend = Backend(models.WordLevel({"[PAD]": 0, "hi": 1, "there": 2}, unk_token="[PAD]"))
>>> backend.pre_tokenizer = pre_tokenizers.Whitespace()
>>> tok = Tokenizer(backend, pad_token="[PAD]")
>>> tok("hi there")["input_ids"]
[1, 2]
>>> tok(["hi there", "hi"], padding=True, return_tensors="pt")["attention_mask"].tolist()
[[1, 1], [1, 0]]
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend

from kernelhub.declare.errors import CheckpointError
from kernelhub.checkpoint.batch_encoding import BatchEncoding
from kernelhub.checkpoint.chat_template import render_chat
from kernelhub.checkpoint.hf_layout import read_json_object

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PADDING = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
TRUNCATION = {None: False, False: False, "do_not_truncate": False, True: True, "longest_first": True,
              "only_first": True}
RETURN_TENSORS = (None, "pt")
SIDES = ("right", "left")
LARGE = 1_000_000  # transformers writes 1e30 for "no limit"
# tokenizer classes whose models take token_type_ids (transformers' model_input_names)
WITH_TOKEN_TYPES = ("Bert", "DistilBert", "Electra", "MPNet", "XLMRoberta")


class Tokenizer:
    """Encode text to model inputs and decode ids back, named and defaulted as in transformers.

    Special tokens are strings (`pad_token`, `eos_token`, ...) with ids (`pad_token_id`, ...);
    `padding_side` / `truncation_side` are "right" or "left" (as tokenizer_config.json says, else
    "right", as transformers reads it); `model_max_length` is None when the checkpoint sets no limit.
    Batches for a decoder's `generate` need left padding (it refuses right-padded rows): set
    `tokenizer.padding_side = "left"` or pass `padding_side="left"` to the call.
    """

    def __init__(self, backend: Backend, *, padding_side: str = "right", truncation_side: str = "right",
                 chat_template: str | None = None, model_max_length: int | None = None,
                 model_input_names: tuple = ("input_ids", "attention_mask"), **special_tokens):
        unknown = sorted(set(special_tokens) - set(SPECIAL))
        if unknown:
            raise TypeError(f"unknown Tokenizer arguments {unknown}; special tokens: {', '.join(SPECIAL)}")
        self.backend = backend
        self.padding_side, self.truncation_side = padding_side, truncation_side
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            _option(name, side, {s: s for s in SIDES})
        self.chat_template, self.model_max_length = chat_template, model_max_length
        self.model_input_names = tuple(model_input_names)
        for name in SPECIAL:
            setattr(self, name, special_tokens.get(name))

    @classmethod
    def from_file(cls, path, **kwargs) -> "Tokenizer":
        """Load `tokenizer.json` from a checkpoint directory, with `tokenizer_config.json`,
        `special_tokens_map.json` and `chat_template.jinja` when present; keywords override them.

        >>> tok = Tokenizer.from_file(minilm_dir())                     # doctest: +SKIP
        >>> tok.pad_token, tok.pad_token_id, tok.padding_side           # doctest: +SKIP
        ('[PAD]', 0, 'right')
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
        config = {**_json(file.with_name("special_tokens_map.json")), **_json(file.with_name("tokenizer_config.json"))}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name", "template"}, ...]: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja = file.with_name("chat_template.jinja")
        if jinja.is_file():
            template = jinja.read_text()
        limit = config.get("model_max_length")
        names = config.get("model_input_names")
        if not isinstance(names, list):
            bert_like = str(config.get("tokenizer_class", "")).startswith(WITH_TOKEN_TYPES)
            names = ["input_ids", "token_type_ids", "attention_mask"] if bert_like else ["input_ids", "attention_mask"]
        options = {name: _content(config.get(name)) for name in SPECIAL}
        options.update(chat_template=template, model_input_names=tuple(names),
                       padding_side=config.get("padding_side", "right"),
                       truncation_side=config.get("truncation_side", "right"),
                       model_max_length=limit if isinstance(limit, int) and limit < LARGE else None)
        return cls(backend, **{**options, **kwargs})

    # -- special tokens ---------------------------------------------------------------------

    def convert_tokens_to_ids(self, tokens):
        """Id of a token string (None if unknown), or a list of them for a list."""
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        """Token string of an id, or a list of them for a list."""
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def _id(self, token):
        return self.backend.token_to_id(token) if token is not None else None

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))
    sep_token_id = property(lambda self: self._id(self.sep_token))
    pad_token_id = property(lambda self: self._id(self.pad_token))
    cls_token_id = property(lambda self: self._id(self.cls_token))
    mask_token_id = property(lambda self: self._id(self.mask_token))

    @property
    def special_tokens_map(self) -> dict:
        """{"pad_token": "[PAD]", ...} for the special tokens that are set."""
        return {name: getattr(self, name) for name in SPECIAL if getattr(self, name) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """The named special tokens, without repeats (as transformers lists them)."""
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The ids of one string.

        >>> tok.encode("Hello")    # doctest: +SKIP
        [101, 7592, 102]
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _encode(self, text: str, add_special_tokens: bool, limit: int | None):
        enc = self.backend.encode(text, add_special_tokens=False)
        if limit is not None:
            processor = self.backend.post_processor
            specials = processor.num_special_tokens_to_add(False) if processor and add_special_tokens else 0
            # truncate the text, then add special tokens: [SEP] survives truncation
            enc.truncate(max(limit - specials, 0), direction=self.truncation_side)
        return self.backend.post_process(enc, add_special_tokens=add_special_tokens)

    def __call__(self, text, *, add_special_tokens: bool = True, padding=False, truncation=None,
                 max_length: int | None = None, pad_to_multiple_of: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool | None = None,
                 return_token_type_ids: bool | None = None) -> BatchEncoding:
        """Encode a string or a list of strings, as transformers' tokenizer call does.

        `padding`: False (default), True/"longest", "max_length" (to `max_length`, else
        `model_max_length`). `truncation`: True cuts to `max_length` (else `model_max_length`),
        keeping special tokens; a `max_length` without padding truncates. `return_tensors`:
        None gives lists (a flat list for one string), "pt" gives [B, S] tensors.

        >>> tok(["A man.", "Hi"], padding=True, return_tensors="pt")      # doctest: +SKIP
        {'input_ids': tensor([[101, 1037, 2158, 1012, 102], [101, 7632, 102, 0, 0]]), ...}
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if texts is None or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
        pad_mode = _option("padding", padding, PADDING)
        truncate = _option("truncation", truncation, TRUNCATION)
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; valid: None (lists), 'pt'")
        if max_length is not None and padding is False and truncation is None:
            truncate = True  # transformers: a max_length alone truncates
        limit = max_length if max_length is not None else self.model_max_length
        if pad_mode is not None and self.pad_token_id is None:
            raise ValueError("asking to pad but the tokenizer has no padding token; set one, e.g. "
                             "tokenizer.pad_token = tokenizer.eos_token")
        encoded = [self._encode(t, add_special_tokens, limit if truncate else None) for t in texts]
        columns = {"input_ids": [e.ids for e in encoded], "token_type_ids": [e.type_ids for e in encoded],
                   "attention_mask": [[1] * len(e.ids) for e in encoded]}
        if pad_mode == "max_length" and limit is None:
            pad_mode = None  # no limit to pad to (transformers does the same)
        if pad_mode is not None:
            width = max(map(len, columns["input_ids"])) if pad_mode == "longest" else limit
            if pad_to_multiple_of:
                width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
            side = _option("padding_side", padding_side or self.padding_side, {s: s for s in SIDES})
            for key, fill in (("input_ids", self.pad_token_id), ("token_type_ids", 0), ("attention_mask", 0)):
                columns[key] = [_pad(row, width, fill, side) for row in columns[key]]
        wanted = {"attention_mask": return_attention_mask, "token_type_ids": return_token_type_ids}
        out = BatchEncoding()
        for key in ("input_ids", "token_type_ids", "attention_mask"):
            include = wanted.get(key)
            if include or (include is None and key in self.model_input_names):
                out[key] = _convert(key, columns[key], single, return_tensors)
        return out

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        """Text of an id, a list of ids or a 1-D tensor (special tokens kept unless skipped).

        >>> tok.decode([101, 7592, 102], skip_special_tokens=True)    # doctest: +SKIP
        'hello'
        """
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        elif isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.backend.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        """`decode` of each row of a [B, S] tensor or a list of id lists."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences]

    # -- chat -------------------------------------------------------------------------------

    def apply_chat_template(self, conversation, *, add_generation_prompt: bool = False, tokenize: bool = True,
                            return_dict: bool = True, return_tensors: str | None = None, padding=False,
                            truncation: bool = False, max_length: int | None = None, tools=None, documents=None,
                            chat_template: str | None = None, **template_kwargs):
        """Render chat messages with the model's template, with transformers' (v5) defaults.

        `conversation` is [{"role", "content"}, ...] or a list of them (a batch). With
        `tokenize=False` the text comes back; otherwise (the default) a `BatchEncoding` of
        the tokens (`return_dict=False`: the ids alone), encoded without adding special
        tokens (the template writes them).

        >>> tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")  # doctest: +SKIP
        {'input_ids': tensor([[1, 9690, ...]]), 'attention_mask': tensor([[1, 1, ...]])}
        """
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                             "chat_template.jinja); pass chat_template=...")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        texts = [render_chat(template, list(messages), add_generation_prompt=add_generation_prompt, tools=tools,
                             documents=documents, **{**self.special_tokens_map, **template_kwargs})
                 for messages in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        enc = self(texts if batched else texts[0], add_special_tokens=False, padding=padding, truncation=truncation,
                   max_length=max_length, return_tensors=return_tensors)
        return enc if return_dict else enc["input_ids"]


def _json(file: Path) -> dict:
    """A tokenizer side file's JSON object, or {} when the checkpoint has none."""
    return read_json_object(file) if file.is_file() else {}


def _content(token):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


def _option(name: str, value, table: dict):
    try:
        return table[value]
    except (KeyError, TypeError):
        valid = ", ".join(repr(k) for k in table)
        raise ValueError(f"{name}={value!r} is not supported; valid: {valid}") from None


def _pad(row: list, width: int, fill: int, side: str) -> list:
    gap = [fill] * max(width - len(row), 0)
    return gap + row if side == "left" else row + gap


def _convert(key: str, rows: list, single: bool, return_tensors):
    if return_tensors is None:
        return rows[0] if single else rows
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"cannot make one tensor of {key} rows of different lengths; pass padding=True "
                         "(and truncation=True for inputs longer than the model takes)")
    return torch.tensor(rows, dtype=torch.long)
