"""Where kernelhub keeps files it makes (converted checkpoints, compiled CPU kernels).

>>> (cache_root() / "gguf").relative_to(cache_root())   # each user of the cache has its folder
PosixPath('gguf')
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$KERNELHUB_CACHE, else $XDG_CACHE_HOME/kernelhub, else ~/.cache/kernelhub."""
    base = os.environ.get("KERNELHUB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kernelhub")
    return Path(base)
