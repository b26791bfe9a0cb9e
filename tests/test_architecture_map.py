"""docs/architecture.md lists every .py, .c, .h and .cpp file under kernelhub/, and only files that exist.

The file map is a fenced block in which a package header is an unindented line whose path ends
in `/` (`kernelhub/runtime/`) and an entry is an indented line that starts with one or more file
names relative to that header (`  sdpa.py flex.py   the backend functions`). The first indented
line under a header sets the entries' indentation; a line indented deeper (a wrapped
description) names no file, and neither does a line that starts with anything but a file name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
PACKAGE = "kernelhub"
SUFFIXES = (".py", ".c", ".h", ".cpp")
FENCE = re.compile(r"^\s*(```|~~~)")


def documented_files(text: str) -> set[str]:
    """Repository-relative paths of the files the map names (every fenced block is read)."""
    named: set[str] = set()
    header: str | None = None
    indent: int | None = None  # the entries' indentation under the current header
    in_block = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_block = not in_block
            header = None
            continue
        if not in_block or not line.strip():
            continue
        tokens = line.split()
        if not line[0].isspace():
            header, indent = (tokens[0] if tokens[0].endswith("/") else None), None
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if header is None or depth > indent:  # deeper: a wrapped description
            continue
        for token in tokens:
            if not token.endswith(SUFFIXES):
                break
            named.add(header + token)
    return named


def _listed_by_git() -> list[str] | None:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run([git, "ls-files", "--cached", "--others", "--exclude-standard", "-z", PACKAGE],
                             cwd=ROOT, capture_output=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return [p for p in out.stdout.decode().split("\0") if p]


def _walked() -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT / PACKAGE):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        found += [(Path(dirpath) / f).relative_to(ROOT).as_posix() for f in filenames]
    return found


def package_files() -> set[str]:
    """Every .py and .c file under kernelhub/ on disk, except what git ignores."""
    listed = _listed_by_git()
    if listed is None:
        listed = _walked()
    return {p for p in listed
            if p.endswith(SUFFIXES) and "__pycache__" not in p.split("/") and (ROOT / p).is_file()}


def test_parser_reads_headers_and_entries():
    text = ("```\n"
            "kernelhub/            front door\n"
            "  __init__.py         re-exports\n"
            "kernelhub/backends/\n"
            "  sdpa.py flex.py     the backend functions\n"
            "                      wrapped.py is a description, not an entry\n"
            "  skinny_linear.c     C\n"
            "```\n"
            "  outside.py          not in a block\n")
    assert documented_files(text) == {"kernelhub/__init__.py", "kernelhub/backends/sdpa.py",
                                      "kernelhub/backends/flex.py", "kernelhub/backends/skinny_linear.c"}


def test_map_lists_every_file():
    on_disk, documented = package_files(), documented_files(DOC.read_text())
    assert on_disk, "found no files under kernelhub/"
    missing = sorted(on_disk - documented)
    assert not missing, ("docs/architecture.md's file map does not list: " + ", ".join(missing)
                         + " (add one line each under its package header)")


def test_map_names_only_existing_files():
    on_disk, documented = package_files(), documented_files(DOC.read_text())
    stale = sorted(documented - on_disk)
    assert not stale, ("docs/architecture.md's file map names files that do not exist: "
                       + ", ".join(p + (" (ignored by git)" if (ROOT / p).is_file() else "") for p in stale))
