r"""Test helpers: write a Hub-layout kernel repo from Python objects, fill an offline cache.

`write_kernel_repo` turns classes and functions into a complete kernel repo (build.toml,
card, source package, a test, a benchmark) and builds its variants, so a test can bind,
lock or publish a kernel it defined three lines earlier. `populate_hub_cache` lays a
built repo out exactly as `huggingface_hub` caches a download (`kernels--org--name`,
snapshots, refs), for offline tests. The pytest plugin wraps both as fixtures.

Classes and functions are written out by their source (`inspect.getsource`), or given
as source text:

>>> import tempfile
>>> doubler = "class Doubler(torch.nn.Module):\n    def forward(self, x):\n        return 2 * x\n"
>>> repo = write_kernel_repo(tempfile.mkdtemp(), "doubler", layers=[doubler])
>>> sorted(p.name for p in (repo / "build").iterdir())
['torch-cpu']
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import textwrap
from pathlib import Path

from kernelhub.kernel.build import build_kernel, python_name

HEADER = "import torch\nimport torch.nn.functional as F\n\n\n"


def _source(obj) -> str:
    return obj if isinstance(obj, str) else textwrap.dedent(inspect.getsource(obj))


def write_kernel_repo(path, name: str, *, layers=(), functions=(), version: int = 1, backends=("cpu",),
                      kernelhub_json: dict | None = None, kernels_minver: str | None = None,
                      init_source: str = "") -> Path:
    """Write and build a kernel repo at `path` exposing `layers.<Class>` and top-level functions."""
    repo = Path(path)
    pkg = repo / "torch-ext" / python_name(name)
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "layers.py").write_text(HEADER + "\n\n".join(_source(c) for c in layers))
    (pkg / "_functions.py").write_text(HEADER + "\n\n".join(_source(f) for f in functions))
    imports = "".join(f"from ._functions import {f.__name__}\n" for f in functions if not isinstance(f, str))
    (pkg / "__init__.py").write_text(f"from . import layers\n{imports}{init_source}")
    toml = [f'name = "{name}"', f"version = {version}", 'license = "Apache-2.0"',
            f"backends = {json.dumps(list(backends))}", "python-depends = []"]
    if kernels_minver:
        toml.append(f'kernels-minver = "{kernels_minver}"')
    (repo / "build.toml").write_text("[general]\n" + "\n".join(toml) + "\n")
    (repo / "README.md").write_text(f"---\nlicense: apache-2.0\ntags: [kernel]\n---\n\n# {name}\n")
    (repo / "tests").mkdir(exist_ok=True)
    (repo / "tests" / f"test_{python_name(name)}.py").write_text("def test_imports():\n    pass\n")
    (repo / "benchmarks").mkdir(exist_ok=True)
    (repo / "benchmarks" / "benchmark.py").write_text(
        "from kernels.benchmark import Benchmark\n\n\nclass Smoke(Benchmark):\n    pass\n")
    if kernelhub_json is not None:
        (repo / "kernelhub.json").write_text(json.dumps(kernelhub_json, indent=2))
    build_kernel(repo)
    return repo


def point_hub_at(monkeypatch, endpoint: str | None, cache_dir, *, offline: bool = False) -> None:
    """Make huggingface_hub (and so `kernels`) use `endpoint` (None: keep it) and `cache_dir`,
    online or offline, for one test; kernelhub's memo of loaded kernels is cleared.

    `monkeypatch` is pytest's: everything is restored when the test ends.
    """
    from huggingface_hub import constants

    from kernelhub.registry.hub.loader import forget_loaded

    if endpoint is not None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        # Download URLs are built from this template, not from ENDPOINT.
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    forget_loaded()


def populate_hub_cache(cache_dir, repo_id: str, repo_dir, *, branches=("main", "v1")) -> str:
    """Copy a built kernel repo into an HF hub cache as `huggingface_hub` would; returns the
    (made-up, content-derived) commit sha the refs point to."""
    repo_dir = Path(repo_dir)
    files = sorted(p for p in repo_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    digest = hashlib.sha1(b"".join(p.relative_to(repo_dir).as_posix().encode() + p.read_bytes() for p in files))
    commit = digest.hexdigest()
    org, name = repo_id.split("/")
    root = Path(cache_dir) / f"kernels--{org}--{name}"
    snapshot = root / "snapshots" / commit
    for path in files:
        dest = snapshot / path.relative_to(repo_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for branch in branches:
        (root / "refs" / branch).write_text(commit)
    return commit
