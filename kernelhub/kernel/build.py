"""`kernelhub kernel build DIR`: one source tree, one Hub build variant per backend.

A kernel repo keeps its Python/Triton source once, in `torch-ext/<python_name>/`, and
its description in `build.toml`. Building writes `build/torch-<backend>/` for every
backend listed there: a copy of the source plus the `metadata.json` Hugging Face `kernels`
reads. Triton kernels are JIT-compiled, so every variant is the same source ("noarch").
Builds are reproducible: no timestamps, the id is a digest of the sources.

>>> import tempfile, pathlib
>>> repo = pathlib.Path(tempfile.mkdtemp())
>>> _ = (repo / "build.toml").write_text('[general]\\nname = "demo"\\nversion = 1\\nbackends = ["cpu"]\\n')
>>> (repo / "torch-ext" / "demo").mkdir(parents=True)
>>> _ = (repo / "torch-ext" / "demo" / "__init__.py").write_text("")
>>> [p.name for p in build_kernel(repo)]
['torch-cpu']
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tomllib
from pathlib import Path

from kernelhub.declare.errors import KernelhubError
from kernelhub.kernel.ignore import copytree_ignore, walk

BACKENDS = ("cpu", "cuda", "rocm", "xpu", "metal")


def read_build_toml(repo: Path) -> dict:
    """The `[general]` table of build.toml, checked."""
    path = Path(repo) / "build.toml"
    if not path.is_file():
        raise KernelhubError(f"{str(repo)!r} has no build.toml; a kernel repo needs one with a [general] table "
                             "(name, version, backends)")
    try:
        general = tomllib.loads(path.read_text()).get("general", {})
    except tomllib.TOMLDecodeError as e:
        raise KernelhubError(f"{str(path)!r} is not valid TOML: {e}") from None
    for key in ("name", "version", "backends"):
        if key not in general:
            raise KernelhubError(f"{str(path)!r}: [general] misses {key!r}")
    unknown = sorted(set(general["backends"]) - set(BACKENDS))
    if unknown or not general["backends"]:
        raise KernelhubError(f"{str(path)!r}: backends {unknown or '[]'} are not valid; "
                             f"choose from {', '.join(BACKENDS)}")
    if not isinstance(general["version"], int) or general["version"] < 1:
        raise KernelhubError(f"{str(path)!r}: version must be a positive integer (the v<N> branch it publishes to)")
    return general


def python_name(name: str) -> str:
    return name.replace("-", "_")


def source_dir(repo: Path, general: dict) -> Path:
    src = Path(repo) / "torch-ext" / python_name(general["name"])
    if not (src / "__init__.py").is_file():
        raise KernelhubError(f"{str(repo)!r}: the kernel source must be a package at {str(src / '__init__.py')!r}")
    return src


def _digest(repo: Path, src: Path) -> str:
    """A digest of the source files build copies (caches and what .gitignore names are not the source)."""
    h, prefix = hashlib.sha256(), src.relative_to(repo).as_posix() + "/"
    for rel, path in walk(repo):
        if rel.startswith(prefix):
            h.update(rel.removeprefix(prefix).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:10]


def metadata(general: dict, backend: str, digest: str) -> dict:
    data = {"id": f"_{python_name(general['name'])}_{backend}_{digest}", "name": general["name"],
            "version": general["version"], "license": general.get("license", "Apache-2.0"),
            "python-depends": list(general.get("python-depends", [])), "backend": {"type": backend}}
    if "kernels-minver" in general:
        data["kernels-minver"] = general["kernels-minver"]
    return data


def build_kernel(repo) -> list[Path]:
    """Write `build/torch-<backend>/` for each backend in build.toml; returns the variant dirs."""
    repo = Path(repo)
    general = read_build_toml(repo)
    src = source_dir(repo, general)
    digest = _digest(repo, src)
    build = repo / "build"
    shutil.rmtree(build, ignore_errors=True)
    variants, ignore = [], copytree_ignore(repo)  # caches and what the repo's .gitignore names stay behind
    for backend in general["backends"]:
        variant = build / f"torch-{backend}"
        shutil.copytree(src, variant / python_name(general["name"]), ignore=ignore)
        (variant / "metadata.json").write_text(json.dumps(metadata(general, backend, digest), indent=2) + "\n")
        if (repo / "kernelhub.json").is_file():  # declarations kernelhub reads before import
            shutil.copy2(repo / "kernelhub.json", variant / "kernelhub.json")
        variants.append(variant)
    return variants
