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
    so `main(argv)` returns a status to callers and tests. An unrecognized option gets the
    closest option of the command it was given to (`--max_new_tokens`: did you mean
    `--max-new-tokens`?).

    >>> Parser(prog="kernelhub").parse_args(["--nope"])
    Traceback (most recent call last):
    kernelhub.cli.args.UsageError: unrecognized arguments: --nope (see `kernelhub --help`)
    >>> p = Parser(prog="kernelhub")
    >>> _ = p.add_argument("--max-new-tokens")
    >>> p.parse_args(["--max_new_tokens", "3"])
    Traceback (most recent call last):
    kernelhub.cli.args.UsageError: unrecognized arguments: --max_new_tokens 3 (did you mean --max-new-tokens?) ...
    """

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            hint = did_you_mean(extras, _options(self, namespace))
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return namespace

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _options(parser: argparse.ArgumentParser, namespace) -> list[str]:
    """The option strings of `parser` and of the subcommands `namespace` chose below it."""
    options = [o for action in parser._actions for o in action.option_strings]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
            if chosen is not None:
                options += _options(chosen, namespace)
    return options


def did_you_mean(extras: list[str], options: list[str]) -> str:
    """' (did you mean --x?)' for the first unrecognized option with a close known one, else ''.

    >>> did_you_mean(["--max_new_tokens"], ["--max-new-tokens", "--attn"])
    ' (did you mean --max-new-tokens?)'
    >>> did_you_mean(["--atn=flex"], ["--max-new-tokens", "--attn"])
    ' (did you mean --attn?)'
    """
    import difflib

    for extra in extras:
        if not extra.startswith("-"):
            continue
        name = extra.split("=", 1)[0]
        dashed = name.replace("_", "-")
        close = [dashed] if dashed in options else difflib.get_close_matches(dashed, options, n=1, cutoff=0.75)
        if close:
            return f" (did you mean {close[0]}?)"
    return ""


def verbosity_level(verbose: int, quiet: int) -> int:
    """The `kernelhub` logger level for `-v`/`-q` counts: warning by default, each -v one step
    louder (info, debug), each -q one step quieter (error, critical).

    >>> verbosity_level(1, 0), verbosity_level(2, 0), verbosity_level(0, 1), verbosity_level(0, 5)
    (20, 10, 40, 50)
    """
    return min(50, max(10, 30 - 10 * verbose + 10 * quiet))


def device_type(text: str) -> str:
    """argparse `type=` for `--device`: a device torch knows and this process can use, checked
    before any weight is read (torch's own error on a CPU-only build is a bare AssertionError).

    >>> device_type("cpu")
    'cpu'
    """
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; write cpu, cuda, cuda:N or mps "
                                         f"(usable here: {', '.join(usable_devices())})") from None
    if device.type == "cpu":
        return text
    try:
        torch.empty(0, device=device)
    except (AssertionError, RuntimeError) as e:  # AssertionError: "Torch not compiled with CUDA enabled"
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:120]
        raise argparse.ArgumentTypeError(f"{text!r} cannot be used here ({why}); usable here: "
                                         f"{', '.join(usable_devices())}") from None
    return text


def usable_devices() -> list[str]:
    """The devices this process can allocate on: cpu, every visible cuda:N, mps."""
    import torch

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    return devices + (["mps"] if mps is not None and mps.is_available() else [])


def _example(option: str) -> str:
    if option == "--kernels":
        return ("""JSON like '{"RMSNorm": "org/rmsnorm@v1"}', key=value pairs like """
                "RMSNorm=org/rmsnorm@v1,Linear=onednn, or from_config (what the checkpoint recorded)")
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
    if option == "--kernels" and text == "from_config":  # apply the request the checkpoint recorded
        return text
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


def source_options(args) -> dict:
    """The `from_pretrained` arguments that `add_source_options` parsed: which revision and .gguf file of
    MODEL, and how to load it."""
    return {"revision": args.revision, "gguf_file": args.gguf_file, "dequantize": args.dequantize}


def add_source_options(p: argparse.ArgumentParser) -> None:
    """`--revision`, `--gguf-file` and `--dequantize` on a command that loads MODEL."""
    p.add_argument("--revision", default=None, metavar="REV",
                   help="with a Hub id: the branch, tag or commit to download (or write MODEL as org/name@REV)")
    p.add_argument("--gguf-file", default=None, metavar="FILE",
                   help="a .gguf file inside the Hub repo (or inside the MODEL directory)")
    p.add_argument("--dequantize", action="store_true", default=None,
                   help="a GGUF model: load float weights (default: blocks stay packed where a kernel serves)")
