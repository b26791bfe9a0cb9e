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
import errno
import os
import re
from pathlib import Path

from kernelhub.declare.errors import KernelRefError

SHAPE = "'org/name[@rev][:Symbol]' (rev: v<N>, a branch, a tag or a commit) or a local directory"
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_REV = re.compile(r"^[A-Za-z0-9._/-]+$")
MAX_LENGTH = 4096  # PATH_MAX on Linux; a Hub ref is far shorter (96-character names, 255-character revisions)


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


def _bad(text, origin, why) -> KernelRefError:
    shown = text if not isinstance(text, str) or len(text) <= 80 else f"{text[:60]}...({len(text)} characters)"
    return KernelRefError(f"{origin}: {shown!r} is not a valid kernel reference: {why}. Expected {SHAPE}")


def _check_text(value, origin) -> None:
    """Refuse what no file system call may see: a NUL byte (ValueError from the OS layer) or a
    value past PATH_MAX (OSError: file name too long)."""
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if isinstance(text, bytes):
        raise _bad(text, origin, "a bytes path; pass a str or pathlib.Path")
    if isinstance(text, str) and "\0" in text:
        raise _bad(text, origin, "it contains a NUL character")
    if isinstance(text, str) and len(text) > MAX_LENGTH:
        raise _bad(text, origin, f"it is {len(text)} characters long; the limit is {MAX_LENGTH}")


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
    _check_text(value, origin)
    if isinstance(value, os.PathLike):
        return LocalRef(Path(value).expanduser(), None)
    path, symbol = value, None
    if not _is_dir(value) and ":" in value:
        path, symbol = _split_symbol(value, origin)
    path = Path(path).expanduser()
    if not _is_dir(path):
        try:
            path.stat()
        except OSError as e:  # say why when the OS refused the name itself (ENAMETOOLONG, ELOOP)
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise _bad(value, origin, f"the directory cannot be used ({e.strerror})") from None
        raise KernelRefError(f"{origin}: local kernel directory {str(path)!r} does not exist "
                             f"(resolved to {str(path.resolve())!r})")
    return LocalRef(path, symbol)


def _is_dir(path) -> bool:
    """Path.is_dir that answers False where the OS refuses the name (a component past NAME_MAX)."""
    try:
        return Path(path).expanduser().is_dir()
    except OSError:
        return False


def _guessed_directory(text: str) -> str | None:
    """The existing directory a Hub-looking value names (with or without its ':Symbol'), if any."""
    body, sep, symbol = text.rpartition(":")
    for candidate in (text, body if sep and symbol.isidentifier() else None):
        if candidate and _is_dir(candidate):
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
    _check_text(value, origin)
    if is_local_ref(value):
        return parse_local_ref(value, origin)
    if isinstance(value, str):
        directory = _guessed_directory(value)
        if directory is not None:
            raise KernelRefError(f"{origin}: a directory {directory} exists; write ./{value} for the local kernel "
                                 "(a Hub repo id never names a local directory here)")
    return parse_hub_ref(value, origin)


def _colon_for_at(text: str) -> str | None:
    """`org/name@v1` (and its symbol) when `text` has ':' where '@' belongs, else None.

    >>> _colon_for_at("my-org/rmsnorm:v1"), _colon_for_at("my-org/rmsnorm:v2:RMSNorm"), _colon_for_at("o/n:RMSNorm")
    ('my-org/rmsnorm@v1', 'my-org/rmsnorm@v2:RMSNorm', None)
    """
    match = re.fullmatch(r"([^@:]+/[^@:]+):(v\d+)(:[^@:]*)?", text)
    return f"{match.group(1)}@{match.group(2)}{match.group(3) or ''}" if match else None


def parse_hub_ref(value, origin: str) -> HubRef:
    """A `HubRef` from 'org/name[@rev][:Symbol]' (never a directory); a clear error for a malformed one.

    >>> parse_hub_ref("my-org/rmsnorm@v2", "--repo")
    HubRef(repo_id='my-org/rmsnorm', revision=None, version=2, symbol=None)
    """
    if not isinstance(value, str):
        raise _bad(value, origin, f"got {type(value).__name__}")
    _check_text(value, origin)
    text = value.strip()
    if text != value or not text or any(c.isspace() for c in text):
        raise _bad(value, origin, "it contains whitespace or is empty")
    typo = _colon_for_at(text)
    if typo:
        raise _bad(value, origin, f"':' comes before a symbol and '@' before a revision (did you mean {typo}?)")
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
        if len(part) > 96:
            raise _bad(value, origin, f"the {what} is {len(part)} characters long; Hub names have at most 96")
        if not _NAME.match(part) or ".." in part or "--" in part:
            raise _bad(value, origin, f"the {what} {part!r} may only hold letters, digits, '-', '_' and '.', "
                                      "not at either end, without '--' or '..'")
    if len(rev) > 255:
        raise _bad(value, origin, f"the revision is {len(rev)} characters long; a revision has at most 255")
    if rev and not _REV.match(rev):
        raise _bad(value, origin, f"revision {rev!r} has characters a Hub revision cannot have")
    match = re.fullmatch(r"v(\d+)", rev)
    if match:
        return HubRef(repo_id, None, int(match.group(1)), symbol)
    return HubRef(repo_id, rev or "main", None, symbol)
