"""`model.generation_config`: generation defaults from `generation_config.json` (or config.json).

Read like transformers reads it: token ids (`eos_token_id` may be a list), length limits and
sampling settings; fields kernelhub does not use are kept in `raw` and ignored. `generate`
takes its defaults from here for every option the call does not pass.

>>> gc = GenerationConfig.from_dict({"eos_token_id": [2, 7], "max_new_tokens": 64, "top_k": 50})
>>> gc.eos_token_id, gc.sampling_defaults()["max_new_tokens"]
([2, 7], 64)
>>> GenerationConfig.from_dict({"eos_token_id": "2"}, "generation_config.json")
Traceback (most recent call last):
    ...
kernelhub.declare.errors.ConfigError: generation_config.json: 'eos_token_id' is '2' (str); allowed: ...
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kernelhub.declare.errors import ConfigError
from kernelhub.declare.json_limits import read_json_file
from kernelhub.declare.config_schema import found, invalid

FILE = "generation_config.json"
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# field -> (accepts the value, what is allowed); all optional (None = not set)
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0")
_NUM = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
_RULES = {
    "bos_token_id": _INT, "pad_token_id": _INT,
    "eos_token_id": (lambda v: _INT[0](v) or (isinstance(v, list) and v and all(map(_INT[0], v))),
                     "a token id (an int >= 0) or a non-empty list of them"),
    "max_new_tokens": _INT, "max_length": _INT, "min_new_tokens": _INT, "top_k": _INT,
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": _NUM, "top_p": _NUM, "repetition_penalty": _NUM,
}


@dataclasses.dataclass
class GenerationConfig:
    """Generation defaults of a model; every field None means "not set" (kernelhub's default applies).

    >>> GenerationConfig().eos_token_id is None
    True
    """

    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    raw: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, source: str = FILE) -> "GenerationConfig":
        """The fields kernelhub uses from a generation config dict, type-checked (JSON null = unset)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: the generation config is {found(d)}; allowed: a JSON object")
        values = {}
        for key, (ok, allowed) in _RULES.items():
            value = d.get(key)
            if value is not None and not ok(value):
                raise invalid(source, key, value, allowed)
            values[key] = value
        return cls(**values, raw=dict(d))

    @classmethod
    def from_model_config(cls, config: dict) -> "GenerationConfig":
        """Token ids from a model's config.json (what transformers does without generation_config.json)."""
        # Lenient: old configs carry values such as pad_token_id=-1, which transformers also ignores.
        return cls.from_dict({k: config.get(k) for k in TOKEN_FIELDS if _RULES[k][0](config.get(k))}, "config.json")

    @classmethod
    def from_checkpoint(cls, path, config: dict) -> "GenerationConfig":
        """`generation_config.json` next to config.json when present, else the model config's token ids."""
        file = Path(path) / FILE
        if not file.is_file():
            return cls.from_model_config(config)
        return cls.from_dict(read_json_file(file, str(file), ConfigError, max_bytes=1 << 20), str(file))

    def sampling_defaults(self) -> dict:
        """The set fields that `SamplingParams` takes, as keywords (eos lists become tuples)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("raw", "bos_token_id") and value is not None:
                out[f.name] = tuple(value) if isinstance(value, list) else value
        return out

    def to_dict(self) -> dict:
        """What `save_pretrained` writes: the raw file, with the fields as they are now."""
        return {**self.raw, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                               if f.name != "raw" and getattr(self, f.name) is not None}}
