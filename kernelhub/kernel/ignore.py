"""Which files of a kernel repo are the repo: caches never are, and the repo's `.gitignore` says the rest.

`kernelhub kernel build` copies the source without them, and `kernelhub kernel publish`
uploads (and `--dry-run` lists) only what `repo_files` returns:

- always skipped, wherever they are: `__pycache__/`, `*.pyc`, `.pytest_cache/`, `.venv/`,
  `venv/`, `.git/`, `.cache/` (huggingface_hub's metadata), `.mypy_cache/`, `.ruff_cache/`,
  `.hypothesis/`, `.tox/`, `.ipynb_checkpoints/`, `*.egg-info/`, `.DS_Store`;
- skipped by the `.gitignore` files inside the repo (the root one and any nested one; git's
  rules: `#` comments, `!` re-includes, a trailing `/` matches directories only, a pattern
  with a `/` before its end is anchored to its `.gitignore`'s folder, `*`, `?`, `[...]`, `**`);
  `.gitignore` files of folders *around* the repo do not apply (the repo is published alone);
- `build/` is never skipped by a `.gitignore` (it is what `publish` builds and uploads), only
  its caches are.

>>> rules = IgnoreRules.from_lines(["*.log", "/scratch/", "!keep.log", "docs/**/draft.md"])
>>> [rules.skipped(p, is_dir=d) for p, d in [("a/b.log", False), ("keep.log", False), ("scratch", True),
...                                             ("src/scratch", True), ("docs/x/y/draft.md", False)]]
[True, False, True, False, True]
>>> always_skipped("tests/__pycache__", is_dir=True), always_skipped(".pytest_cache", is_dir=True)
(True, True)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

SKIP_DIRS = frozenset({"__pycache__", ".pytest_cache", ".venv", "venv", ".git", ".cache", ".mypy_cache",
                       ".ruff_cache", ".hypothesis", ".tox", ".ipynb_checkpoints"})
SKIP_DIR_SUFFIXES = (".egg-info",)
SKIP_FILES = frozenset({".DS_Store"})
SKIP_SUFFIXES = (".pyc", ".pyo")
BUILD = "build"  # what `kernel build` writes and `publish` uploads: no .gitignore can drop it


def always_skipped(rel: str, *, is_dir: bool) -> bool:
    """True for caches and virtual environments, skipped whatever `.gitignore` says."""
    name = rel.rsplit("/", 1)[-1]
    if is_dir:
        return name in SKIP_DIRS or name.endswith(SKIP_DIR_SUFFIXES)
    return name in SKIP_FILES or name.endswith(SKIP_SUFFIXES)


def _translate(pattern: str) -> str:
    """A gitignore glob (no leading '/', no trailing '/') as a regex over a '/'-separated path."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("/**", i) and i + 3 == len(pattern):
            out.append("/.*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
        elif pattern[i] == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


class IgnoreRules:
    """The patterns of `.gitignore` files, each relative to the folder its file is in."""

    def __init__(self, rules=()):
        self.rules = list(rules)  # (base folder, regex, negated, directories only)

    @classmethod
    def from_lines(cls, lines, base: str = "") -> IgnoreRules:
        rules = cls()
        rules.add(lines, base)
        return rules

    def add(self, lines, base: str = "") -> None:
        for raw in lines:
            line = raw.rstrip("\n").rstrip()  # trailing spaces are ignored unless escaped (rare: not kept)
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            line = line[1:] if negated else line
            line = line[1:] if line.startswith("\\") and line[1:2] in ("#", "!") else line
            dir_only = line.endswith("/")
            line = line.rstrip("/")
            if not line:
                continue
            anchored = "/" in line
            regex = _translate(line.lstrip("/"))
            regex = regex if anchored else f"(?:.*/)?{regex}"
            self.rules.append((base, re.compile(regex + r"\Z"), negated, dir_only))

    def skipped(self, rel: str, *, is_dir: bool) -> bool:
        """Whether the last matching pattern ignores `rel` (a path relative to the repo root)."""
        result = False
        for base, regex, negated, dir_only in self.rules:
            if dir_only and not is_dir:
                continue
            if base and not rel.startswith(base + "/"):
                continue
            if regex.match(rel[len(base) + 1:] if base else rel):
                result = not negated
        return result


def _read_gitignore(directory: Path) -> list[str]:
    path = directory / ".gitignore"
    try:
        return path.read_text(errors="replace").splitlines() if path.is_file() else []
    except OSError:
        return []


def _skip(rules: IgnoreRules, path: str, is_dir: bool, in_build: bool) -> bool:
    if always_skipped(path, is_dir=is_dir):
        return True
    return not (in_build or path == BUILD) and rules.skipped(path, is_dir=is_dir)


def walk(root) -> list[tuple[str, Path]]:
    """(posix path relative to `root`, path) of every file that belongs to the repo, sorted; folders
    the rules skip are not entered. Symlinks are listed like files (callers decide about them)."""
    root = Path(root)
    rules, found = IgnoreRules(), []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        in_build = prefix.startswith(BUILD + "/")
        if not in_build:
            rules.add(_read_gitignore(here), prefix.rstrip("/"))
        dirnames[:] = sorted(d for d in dirnames
                             if (here / d).is_symlink() or not _skip(rules, prefix + d, True, in_build))
        found += [(prefix + name, here / name) for name in filenames
                  if not _skip(rules, prefix + name, False, in_build)]
        found += [(prefix + d, here / d) for d in dirnames if (here / d).is_symlink()]
    return sorted(found)


def copytree_ignore(root):
    """A `shutil.copytree(ignore=...)` callable applying the repo rules of `root` to a copy of one
    of its folders (for `kernel build`'s copy of the source package)."""
    files = {path.absolute() for _, path in walk(root)}
    folders = {parent for path in files for parent in path.parents}

    def ignore(directory, names):
        here = Path(directory).absolute()
        return {name for name in names if here / name not in files and here / name not in folders}

    return ignore
