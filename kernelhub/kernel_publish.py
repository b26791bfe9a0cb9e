"""`kernelhub kernel publish DIR --repo org/name --version N`: build, then upload to the Hub.

The repo is created as a kernel repo if needed, the `vN` branch is created from `main`
if needed, and the repo (sources, card, tests, benchmarks and the freshly built
`build/` variants) is committed to `vN`, the branch `kernels` resolves `version=N` to.
Uploads go through `huggingface_hub` (token from `HF_TOKEN` or `hf auth login`).

>>> publish_kernel("hub_kernels/rmsnorm", "my-org/rmsnorm", version=1)   # doctest: +SKIP
'3f2a...'
"""

from __future__ import annotations

from pathlib import Path

from kernelhub.kernel_build import build_kernel, read_build_toml
from kernelhub.kernel_check import check_kernel
from kernelhub.declare.errors import KernelhubError
from kernelhub.registry.hub.ref import parse_kernel_ref

IGNORE = ["**/__pycache__/**", "*.pyc", ".git/**"]


def publish_kernel(repo_dir, repo_id: str, *, version: int | None = None, endpoint: str | None = None,
                   token: str | None = None, check: bool = True) -> str:
    """Upload `repo_dir` to `repo_id` on branch v<version>; returns the commit sha."""
    from huggingface_hub import HfApi

    ref = parse_kernel_ref(repo_id, "--repo")
    if ref.symbol or ref.requested != "main":
        raise KernelhubError(f"--repo takes 'org/name' only, got {repo_id!r}; pass the version with --version")
    general = read_build_toml(repo_dir)
    version = general["version"] if version is None else version
    if not isinstance(version, int) or version < 1:
        raise KernelhubError(f"--version must be a positive integer, got {version!r}")
    if check:
        report = check_kernel(repo_dir)
        if not report.ok:
            raise KernelhubError(f"{repo_dir} fails `kernelhub kernel check`: {'; '.join(report.problems)}")
    build_kernel(repo_dir)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(ref.repo_id, repo_type="kernel", exist_ok=True)
    branch = f"v{version}"
    api.create_branch(ref.repo_id, branch=branch, repo_type="kernel", exist_ok=True)
    info = api.upload_folder(folder_path=str(Path(repo_dir)), repo_id=ref.repo_id, repo_type="kernel",
                             revision=branch, ignore_patterns=IGNORE,
                             commit_message=f"Publish {general['name']} {branch} with kernelhub")
    return info.oid
