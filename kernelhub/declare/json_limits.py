"""Reading JSON someone else wrote: bounded in size and nesting, each key once.

Python's `json` reads any size, recurses once per nesting level (a file nested 100,000 deep
raises `RecursionError`), and keeps the last of two equal keys (so two readers of one file
can disagree about what it says). `load_json` and `read_json_file` refuse all three, and
bytes that are not UTF-8, with the error class the caller names, in one line that says
which file, what is wrong and what is allowed.

A file is checked with `os.stat` before it is opened, so a FIFO or a device (`/dev/zero`)
named as a file is refused without a read that could block or never end.

>>> load_json(b'{"a": [1, 2]}', "demo.json", ValueError)
{'a': [1, 2]}
>>> load_json(b'{"a": 1, "a": 2}', "demo.json", ValueError)
Traceback (most recent call last):
ValueError: demo.json is not valid JSON: the key 'a' appears twice in one object; write each key once
>>> load_json(b"[" * 100_000, "deep.json", ValueError)
Traceback (most recent call last):
ValueError: deep.json is nested deeper than 64 levels; JSON files kernelhub reads nest a few levels at most
"""

from __future__ import annotations

import json
import os
import re
import stat

MAX_DEPTH = 64
MAX_BYTES = 16 << 20  # the default cap; each reader passes its own (docs/hub.md lists them)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def human_size(n: int) -> str:
    """'16 MiB' for 16 << 20.

    >>> human_size(2 << 30), human_size(1000)
    ('2 GiB', '1000 bytes')
    """
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def _too_deep(text: str, max_depth: int) -> bool:
    # Brackets outside strings only; json.loads would recurse once per level.
    depth = 0
    for c in _NOT_BRACKET.sub("", _STRING.sub('""', text)):
        depth += 1 if c in "[{" else -1
        if depth > max_depth:
            return True
    return False


def _pairs(where: str, error):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise error(f"{where} is not valid JSON: the key {key!r} appears twice in one object; "
                            "write each key once")
            seen[key] = value
        return seen
    return hook


def load_json(data: bytes | str, where: str, error: type[Exception], *, max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH):
    """The JSON value in `data`, or `error` naming `where` for oversize, non-UTF-8, too deep,
    duplicate keys or invalid JSON."""
    if len(data) > max_bytes:
        raise error(f"{where} is {len(data)} bytes; the limit is {human_size(max_bytes)}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                        "save it as UTF-8 JSON") from None
    if _too_deep(data, max_depth):
        raise error(f"{where} is nested deeper than {max_depth} levels; JSON files kernelhub reads nest a few "
                    "levels at most")
    try:
        return json.loads(data, object_pairs_hook=_pairs(where, error))
    except (json.JSONDecodeError, ValueError, RecursionError) as e:  # ValueError: ints past 4300 digits
        if isinstance(e, error):
            raise
        raise error(f"{where} is not valid JSON: {e}") from None


def check_file(path, where: str, error: type[Exception], *, max_bytes: int) -> None:
    """Refuse, by `os.stat` alone, a `path` that is not a regular file of at most `max_bytes`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{where} does not exist") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL in the path
        raise error(f"{where} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    _check_regular(st, where, error, max_bytes)


def read_capped(path, where: str, error: type[Exception], *, max_bytes: int) -> bytes:
    """The bytes of the regular file `path`, refusing anything else (a FIFO, a device, a
    directory) before opening it, and any file over `max_bytes`."""
    check_file(path, where, error, max_bytes=max_bytes)
    try:  # O_NONBLOCK: a file swapped for a FIFO after the stat cannot block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise error(f"{where} cannot be read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        _check_regular(st, where, error, max_bytes)
        data = f.read(st.st_size + 1)
    if len(data) > st.st_size:
        raise error(f"{where} grew while it was read; write it once, then read it")
    return data


def _check_regular(st, where: str, error, max_bytes: int) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{where} is a directory; name the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{where} is not a regular file (a FIFO, socket or device); name a regular file")
    if st.st_size > max_bytes:
        raise error(f"{where} is {st.st_size} bytes; the limit is {human_size(max_bytes)}")


def read_json_file(path, where: str, error: type[Exception], *, max_bytes: int = MAX_BYTES,
                   max_depth: int = MAX_DEPTH):
    """`load_json` of the regular file `path`, size-checked before it is read."""
    return load_json(read_capped(path, where, error, max_bytes=max_bytes), where, error,
                     max_bytes=max_bytes, max_depth=max_depth)
