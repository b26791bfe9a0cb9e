"""Malicious kernel repos for the supply-chain tests.

Every payload writes a marker file when it is imported: a test that was not fooled finds
no marker. Repos are built with the same tools contributors use (`write_kernel_repo`),
then edited the way an attacker would edit them.
"""

from __future__ import annotations

import importlib._bootstrap_external as bootstrap
import json
from pathlib import Path


from kernelhub.testing import populate_hub_cache, write_kernel_repo
from tests.hub_test_kernels import COUNTED_RMSNORM
from tests.unchanged import refused as unchanged_refused

TRUSTED = "kernelhub-test"

GOOD_RMSNORM = COUNTED_RMSNORM  # an RMSNorm with the reference numbers, as source text


def payload(marker: Path) -> str:
    """Python that leaves `marker` behind when it runs."""
    return f"import pathlib as _p\n_p.Path({str(marker)!r}).write_text('pwned')\n"


def kernel(root: Path, name: str, *, init: str = "", depends=(), layers=(GOOD_RMSNORM,)) -> Path:
    """A built kernel repo at root/name; `depends`: [{"repo-id": ..., "version": N}, ...] in every variant."""
    repo = write_kernel_repo(Path(root) / name, name, layers=list(layers), init_source=init)
    if depends:
        for meta in (repo / "build").glob("*/metadata.json"):
            data = json.loads(meta.read_text())
            data["kernel-depends"] = list(depends)
            meta.write_text(json.dumps(data, indent=2))
    return repo


def variant(repo: Path) -> Path:
    return Path(repo) / "build" / "torch-cpu"


def cached_variant(cache: Path, repo_id: str) -> Path:
    org, name = repo_id.split("/")
    return next((Path(cache) / f"kernels--{org}--{name}" / "snapshots").glob("*/build/torch-cpu"))


def to_cache(cache: Path, repo_id: str, repo: Path) -> str:
    return populate_hub_cache(cache, repo_id, repo)


def plant_pyc(source_file: Path, evil_source: str) -> Path:
    """A `__pycache__` entry for `source_file` holding `evil_source`, its header copying the
    real file's mtime and size, so a plain import would trust and run it."""
    st = source_file.stat()
    code = compile(evil_source, str(source_file), "exec")
    data = bootstrap._code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size)
    pyc = Path(bootstrap.cache_from_source(str(source_file)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(bytes(data))
    return pyc


def refused(model, error, phrases, marker: Path, **kwargs) -> str:
    """`tests.unchanged.refused` with sdpa as the default attention and the marker checked."""
    return unchanged_refused(model, error, phrases, attn=kwargs.pop("attn", "sdpa"), marker=marker, **kwargs)


def dependency_chain(cache: Path, root: Path, length: int, prefix: str = "chain") -> str:
    """`length` cached kernels, each depending on the next; returns the first one's 'org/name@v1'."""
    for i in reversed(range(length)):
        depends = [{"repo-id": f"{TRUSTED}/{prefix}-{i + 1}", "version": 1}] if i + 1 < length else []
        to_cache(cache, f"{TRUSTED}/{prefix}-{i}", kernel(root, f"{prefix}-{i}", depends=depends))
    return f"{TRUSTED}/{prefix}-0@v1"


def diamond(cache: Path, root: Path, levels: int) -> str:
    """Two cached kernels per level, each depending on both kernels of the next level (a graph
    of 2 * levels kernels whose paths number 2 ** levels); returns a top kernel's 'org/name@v1'."""
    for level in reversed(range(levels)):
        below = [{"repo-id": f"{TRUSTED}/d{level + 1}-{side}", "version": 1} for side in "ab"]
        for side in "ab":
            name = f"d{level}-{side}"
            to_cache(cache, f"{TRUSTED}/{name}", kernel(root, name, depends=below if level + 1 < levels else ()))
    return f"{TRUSTED}/d0-a@v1"
