"""Parsing what users type on the command line: one-line usage errors, request values, numbers.

Every helper here either returns a value or raises `argparse.ArgumentTypeError` (inside
`type=`) / `UsageError`, which the CLI prints as one line, `kernelhub: error: ...`, exit 2.

>>> parse_request("sliding_attention=flex,*=sdpa", "--attn")
{'sliding_attention': 'flex', '*': 'sdpa'}
>>> parse_request('["flash", "sdpa"]', "--attn")
['flash', 'sdpa']
"""

from __future__ import annotations

import argparse
import json
import re

DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16")
MODES = ("inference", "training", "compile", "inference|compile", "training|compile")


class UsageError(Exception):
    """Bad command-line usage: printed as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) and raise instead of exiting,
    so `main(argv)` returns a status to callers and tests.

    >>> Parser(prog="kernelhub").parse_args(["--nope"])
    Traceback (most recent call last):
    kernelhub.cli.args.UsageError: unrecognized arguments: --nope (see `kernelhub --help`)
    """

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _example(option: str) -> str:
    if option == "--kernels":
        return ("""JSON like '{"RMSNorm": "org/rmsnorm@v1"}' or key=value pairs like """
                "RMSNorm=org/rmsnorm@v1,Linear=onednn")
    return ("""a name (sdpa, paged|flex, org/repo@v1:fn), JSON like '["flash", "sdpa"]' or """
            """'{"sliding_attention": "flex", "*": "sdpa"}', or key=value pairs like sliding_attention=flex,*=sdpa""")


def _pairs(text: str, option: str) -> dict:
    result = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value or "=" in value:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} in {text!r} is not a key=value pair; write "
                                             f"{_example(option)}")
        if key in result:
            raise argparse.ArgumentTypeError(f"{key!r} appears twice in {text!r}")
        result[key] = value
    return result


def parse_request(text: str, option: str):
    """An `attn_implementation=` / `kernels=` value from the command line.

    JSON (a string, list or object; lists only in JSON) or `key=value,key=value`; for `--attn`
    also a bare name. Anything else is one clear `ArgumentTypeError`.

    >>> parse_request("RMSNorm=org/rmsnorm@v1:RMSNorm", "--kernels")
    {'RMSNorm': 'org/rmsnorm@v1:RMSNorm'}
    >>> parse_request("sdpa", "--attn")
    'sdpa'
    """
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError(f"it is empty; write {_example(option)}")
    if text[0] in "[{\"":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({e.msg} at column {e.colno}); write "
                                             f"{_example(option)}") from None
        allowed = (dict,) if option == "--kernels" else (str, list, dict)
        if not isinstance(value, allowed):
            raise argparse.ArgumentTypeError(f"{text!r} is a JSON {type(value).__name__}; write {_example(option)}")
        return value
    if "=" in text:
        return _pairs(text, option)
    if option == "--kernels" or "," in text:  # a list needs JSON: a bare comma is too easy to misread
        raise argparse.ArgumentTypeError(f"{text!r} is neither JSON nor key=value pairs; write {_example(option)}")
    return text


def request_type(option: str):
    """An argparse `type=` for `--attn` / `--kernels` (its name makes argparse's message read well)."""
    def value(text):
        return parse_request(text, option)
    value.__name__ = option.lstrip("-")
    return value


def positive_int(text: str) -> int:
    """argparse `type=`: an integer >= 1.

    >>> positive_int("3")
    3
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (1 or more)")
    return value


def non_negative_float(text: str) -> float:
    """argparse `type=`: a finite float >= 0 (a temperature)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def probability(text: str) -> float:
    """argparse `type=`: a float in (0, 1] (top-p)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


def one_line(message: str) -> str:
    """Error text as one line: multi-line reasons joined with '; '.

    >>> one_line("cannot bind:\\n  - flash: needs CUDA\\n  - flex: head_dim 8")
    'cannot bind: flash: needs CUDA; flex: head_dim 8'
    >>> one_line("--repo takes 'org/name' only")
    "--repo takes 'org/name' only"
    """
    lines = [re.sub(r"^[-*•]\s+", "", line.strip()) for line in str(message).splitlines()]  # drop bullets
    lines = [line for line in lines if line]
    if not lines:
        return ""
    head, rest = lines[0], lines[1:]
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest) if rest else head
