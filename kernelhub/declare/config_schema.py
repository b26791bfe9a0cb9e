"""Field-by-field checks for the config a model reads (`config.json`, or GGUF metadata).

Each function reads one field of a parsed config, checks its type and range, and returns
it, or raises one `ConfigError` naming the file, the field, what was found and what is
allowed. JSON types are taken literally: `true` is not an int, `64.0` is not an int and
`"64"` is not a number, so a damaged or hostile config fails here, before a model is built.
The `check_*` functions compare a parsed config with the tensor names and shapes of the
weights' headers, so a config that does not belong to its weights fails before anything
is built (a layer count of ten million included).

>>> positive_int({"hidden_size": 64}, "hidden_size", "config.json")
64
>>> positive_int({"hidden_size": True}, "hidden_size", "config.json")
Traceback (most recent call last):
    ...
kernelhub.declare.errors.ConfigError: config.json: 'hidden_size' is True (bool); allowed: a positive int
"""

from __future__ import annotations

import math
import re
import reprlib

from kernelhub.declare.errors import ConfigError

REQUIRED = object()  # the default of a field that must be present
_SHORT = reprlib.Repr()  # a hostile value (a list of ten million items) stays a short message
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


def found(value) -> str:
    """`value` as an error message shows it: a short repr and its type."""
    return f"{_SHORT.repr(value)} ({type(value).__name__})"


def invalid(source: str, key: str, value, allowed: str) -> ConfigError:
    """The one error for a bad field: file, field, what was found, what is allowed."""
    return ConfigError(f"{source}: {key!r} is {found(value)}; allowed: {allowed}")


def _get(d: dict, key: str, source: str, default, allowed: str):
    value = d.get(key, default)
    if value is REQUIRED:
        raise ConfigError(f"{source} lacks {key!r}; allowed: {allowed}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def positive_int(d: dict, key: str, source: str, default=REQUIRED) -> int:
    """`d[key]` as an int > 0 (a JSON integer, not a bool, float or string).

    >>> positive_int({}, "head_dim", "config.json", default=8)
    8
    """
    value = _get(d, key, source, default, "a positive int")
    if not _is_int(value) or value <= 0:
        raise invalid(source, key, value, "a positive int")
    return value


def optional_positive_int(d: dict, key: str, source: str) -> int | None:
    """`d[key]` as an int > 0, or None when absent or null."""
    value = d.get(key)
    if value is not None and (not _is_int(value) or value <= 0):
        raise invalid(source, key, value, "a positive int or null")
    return value


def non_negative_int(d: dict, key: str, source: str, default=REQUIRED) -> int:
    """`d[key]` as an int >= 0."""
    value = _get(d, key, source, default, "an int >= 0")
    if not _is_int(value) or value < 0:
        raise invalid(source, key, value, "an int >= 0")
    return value


def positive_float(d: dict, key: str, source: str, default=REQUIRED) -> float:
    """`d[key]` as a finite number > 0 (ints accepted, bools and strings not).

    >>> positive_float({"rms_norm_eps": 1e-6}, "rms_norm_eps", "config.json")
    1e-06
    """
    value = _get(d, key, source, default, "a number > 0")
    if not _is_number(value) or value <= 0:
        raise invalid(source, key, value, "a number > 0")
    return float(value)


def probability(d: dict, key: str, source: str, default=0.0) -> float:
    """`d[key]` as a number in [0, 1): a dropout rate."""
    value = _get(d, key, source, default, "a number in [0, 1)")
    if not _is_number(value) or not 0 <= value < 1:
        raise invalid(source, key, value, "a number in [0, 1)")
    return float(value)


def boolean(d: dict, key: str, source: str, default=REQUIRED) -> bool:
    """`d[key]` as a real bool (JSON true/false, not 0/1 or "true")."""
    value = _get(d, key, source, default, "true or false")
    if not isinstance(value, bool):
        raise invalid(source, key, value, "true or false")
    return value


def choice(d: dict, key: str, choices, source: str, default=REQUIRED) -> str:
    """`d[key]` as one of the strings `choices`."""
    allowed = ", ".join(repr(c) for c in choices)
    value = _get(d, key, source, default, allowed)
    if not isinstance(value, str) or value not in choices:
        raise invalid(source, key, value, allowed)
    return value


def mapping(d: dict, key: str, source: str) -> dict:
    """`d[key]` as an object, {} when absent or null."""
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(source, key, value, "an object or null")
    return value


def choice_list(d: dict, key: str, choices, length: int, length_key: str, source: str) -> list | None:
    """`d[key]` as a list of `length` strings from `choices`, or None when absent or null.

    >>> choice_list({"layer_types": ["full"]}, "layer_types", ("full",), 1, "num_hidden_layers", "c.json")
    ['full']
    """
    value = d.get(key)
    if value is None:
        return None
    allowed = f"a list of {length_key} ({length}) items from {', '.join(repr(c) for c in choices)}"
    if not isinstance(value, list) or len(value) != length:
        raise invalid(source, key, value, allowed)
    for i, item in enumerate(value):
        if not isinstance(item, str) or item not in choices:
            raise invalid(source, f"{key}[{i}]", item, ", ".join(repr(c) for c in choices))
    return value


def divides(source: str, key: str, value: int, of_key: str, of_value: int) -> None:
    """Require `value` (field `key`) to divide `of_value` (field `of_key`)."""
    if of_value % value:
        raise ConfigError(f"{source}: {of_key!r} is {of_value}, not a multiple of {key!r} ({value}); "
                          f"allowed: a {key} that divides {of_key}")


# -- sizes against the weights' headers ------------------------------------------------

def check_layer_count(key: str, value: int, shapes: dict, prefix: str, source: str, weights: str) -> None:
    """Require the weights to hold exactly `value` layers named `{prefix}.N.*`.

    >>> check_layer_count("num_hidden_layers", 2, {"layers.0.w": (1,), "layers.1.w": (1,)}, "layers", "c", "w")
    """
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    held = {m.group(1) for name in shapes if (m := pattern.match(name))}
    if value != len(held):
        raise ConfigError(f"{source}: {key!r} is {value} but the weights in {weights} hold {len(held)} layers "
                          f"({prefix}.N); the config does not belong to these weights")


def check_dims(shapes: dict, tensor: str, fields, source: str, weights: str) -> None:
    """Require `tensor`'s shape to be the config's sizes: `fields` is one (key, value) per dimension
    (None: that dimension is not checked here).

    A tensor that is absent is left to the weight loader, which names every missing tensor.

    >>> check_dims({"emb": (8, 4)}, "emb", [("vocab_size", 8), ("hidden_size", 4)], "c", "w")
    """
    shape = shapes.get(tensor)
    if shape is None:
        return
    for dim, field in enumerate(fields):
        if field is None:
            continue
        key, value = field
        if len(shape) <= dim or shape[dim] != value:
            raise ConfigError(f"{source}: {key!r} is {value} but {tensor!r} in {weights} has shape "
                              f"{tuple(shape)}; the config does not belong to these weights")
