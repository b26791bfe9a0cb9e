"""Parsing kernel references: `org/name[@rev][:Symbol]` on the Hub, or a local directory.

    "kernels-community/rmsnorm@v1:RMSNorm"    version branch v1, layer RMSNorm
    "my-org/rmsnorm@main"                     a branch (symbol defaults to the layer name)
    "my-org/rmsnorm@3f2a...c9"                a commit
    "./hub_kernels/rmsnorm"                   a local directory in the Hub kernel layout
    "./hub_kernels/rmsnorm:RMSNorm"           ... with an explicit symbol

Only the shape is checked here; nothing is downloaded or imported. A value that names an
existing directory but does not start with './', '/' or '~' is refused, never guessed:
`hub_kernels/rmsnorm` could be that directory or a Hub repo of the same name.

>>> parse_kernel_ref("kernels-community/rmsnorm@v1:RMSNorm", "example")
HubRef(repo_id='kernels-community/rmsnorm', revision=None, version=1, symbol='RMSNorm')
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from kernelhub.declare.errors import KernelhubError

SHAPE = "'org/name[@rev][:Symbol]' (rev: v<N>, a branch, a tag or a commit) or a local directory"
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_REV = re.compile(r"^[A-Za-z0-9._/-]+$")


@dataclasses.dataclass(frozen=True)
class HubRef:
    """A kernel repo on the Hub. Exactly one of `revision`/`version` is set."""

    repo_id: str
    revision: str | None
    version: int | None
    symbol: str | None

    @property
    def requested(self) -> str:
        """The revision as the user asked for it: 'v1', 'main', a commit."""
        return f"v{self.version}" if self.version is not None else self.revision

    def __str__(self):
        return f"{self.repo_id}@{self.requested}" + (f":{self.symbol}" if self.symbol else "")


@dataclasses.dataclass(frozen=True)
class LocalRef:
    """A kernel directory on disk (a Hub kernel repo, its `build/`, or one variant)."""

    path: Path
    symbol: str | None

    def __str__(self):
        return str(self.path) + (f":{self.symbol}" if self.symbol else "")


def _bad(text, origin, why) -> KernelhubError:
    return KernelhubError(f"{origin}: {text!r} is not a valid kernel reference: {why}. Expected {SHAPE}")


def looks_like_kernel_ref(value) -> bool:
    """True for strings that name a Hub repo or a path rather than a registered name."""
    if isinstance(value, os.PathLike):
        return True
    return isinstance(value, str) and ("/" in value or value.startswith((".", "~")) or "@" in value)


def is_local_ref(value) -> bool:
    """True for what names a directory rather than a Hub repo: a path object, or text
    starting with '.', '/' or '~'."""
    return isinstance(value, os.PathLike) or (isinstance(value, str) and value.startswith((".", "/", "~")))


def _split_symbol(text, origin):
    body, sep, symbol = text.rpartition(":")
    if not sep:
        return text, None
    if not symbol:
        raise _bad(text, origin, "':' is not followed by a symbol")
    if not symbol.isidentifier():
        raise _bad(text, origin, f"symbol {symbol!r} is not a Python identifier")
    return body, symbol


def parse_local_ref(value, origin: str) -> LocalRef:
    if isinstance(value, os.PathLike):
        return LocalRef(Path(value).expanduser(), None)
    path, symbol = value, None
    if not Path(value).expanduser().is_dir() and ":" in value:
        path, symbol = _split_symbol(value, origin)
    path = Path(path).expanduser()
    if not path.is_dir():
        raise KernelhubError(f"{origin}: local kernel directory {str(path)!r} does not exist "
                             f"(resolved to {str(path.resolve())!r})")
    return LocalRef(path, symbol)


def _guessed_directory(text: str) -> str | None:
    """The existing directory a Hub-looking value names (with or without its ':Symbol'), if any."""
    body, sep, symbol = text.rpartition(":")
    for candidate in (text, body if sep and symbol.isidentifier() else None):
        if candidate and Path(candidate).is_dir():
            return candidate
    return None


def parse_kernel_ref(value, origin: str) -> HubRef | LocalRef:
    """A `HubRef` or `LocalRef` from what the user wrote; a clear error for a malformed one.

    Local directories start with './', '/' or '~'; a value that names an existing directory
    without one is an error rather than a guess between the directory and a Hub repo.

    >>> parse_kernel_ref("my-org/rmsnorm@main", "example")
    HubRef(repo_id='my-org/rmsnorm', revision='main', version=None, symbol=None)
    >>> parse_kernel_ref("./hub_kernels/rmsnorm:RMSNorm", "example")      # doctest: +SKIP
    LocalRef(path=PosixPath('hub_kernels/rmsnorm'), symbol='RMSNorm')
    """
    if is_local_ref(value):
        return parse_local_ref(value, origin)
    if isinstance(value, str):
        directory = _guessed_directory(value)
        if directory is not None:
            raise KernelhubError(f"{origin}: a directory {directory} exists; write ./{value} for the local kernel "
                                 "(a Hub repo id never names a local directory here)")
    return parse_hub_ref(value, origin)


def parse_hub_ref(value, origin: str) -> HubRef:
    """A `HubRef` from 'org/name[@rev][:Symbol]' (never a directory); a clear error for a malformed one.

    >>> parse_hub_ref("my-org/rmsnorm@v2", "--repo")
    HubRef(repo_id='my-org/rmsnorm', revision=None, version=2, symbol=None)
    """
    if not isinstance(value, str):
        raise _bad(value, origin, f"got {type(value).__name__}")
    text = value.strip()
    if text != value or not text or any(c.isspace() for c in text):
        raise _bad(value, origin, "it contains whitespace or is empty")
    body, symbol = _split_symbol(text, origin)
    repo_id, at, rev = body.partition("@")
    if at and not rev:
        raise _bad(value, origin, "'@' is not followed by a revision")
    if "@" in rev:
        raise _bad(value, origin, "more than one '@'")
    parts = repo_id.split("/")
    if len(parts) != 2:
        raise _bad(value, origin, f"the repo id {repo_id!r} must be exactly 'org/name'")
    for part, what in zip(parts, ("org", "name")):
        if not part:
            raise _bad(value, origin, f"the {what} is empty")
        if not _NAME.match(part) or ".." in part or "--" in part:
            raise _bad(value, origin, f"the {what} {part!r} may only hold letters, digits, '-', '_' and '.', "
                                      "not at either end, without '--' or '..'")
    if rev and not _REV.match(rev):
        raise _bad(value, origin, f"revision {rev!r} has characters a Hub revision cannot have")
    match = re.fullmatch(r"v(\d+)", rev)
    if match:
        return HubRef(repo_id, None, int(match.group(1)), symbol)
    return HubRef(repo_id, rev or "main", None, symbol)
