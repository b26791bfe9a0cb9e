"""`kernelhub kernel publish DIR --repo org/name [--version N] [--dry-run]`: check, build, upload.

The repo is created as a kernel repo if needed, the `vN` branch is created from `main`
if needed, and the repo (sources, card, tests, benchmarks and the freshly built
`build/` variants) is committed to `vN`, the branch `kernels` resolves `version=N` to.
Uploads go through `huggingface_hub` (token from `HF_TOKEN` or `hf auth login`).

`plan_publish` is the rehearsal: it checks and builds, then lists exactly the files the
upload would send (the real publish uploads that same list), with no network at all.

>>> publish_kernel("hub_kernels/rmsnorm", "my-org/rmsnorm", version=1)   # doctest: +SKIP
'3f2a...'
>>> print("\\n".join(plan_publish("hub_kernels/rmsnorm", "my-org/rmsnorm").lines()))  # doctest: +SKIP
would publish hub_kernels/rmsnorm to my-org/rmsnorm, branch v1 (created from main if missing)
...
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kernelhub.declare.errors import HubKernelError, KernelhubError
from kernelhub.kernel.build import build_kernel, read_build_toml
from kernelhub.kernel.check import check_kernel
from kernelhub.kernel.ignore import walk
from kernelhub.registry.hub.ref import HubRef, parse_hub_ref


@dataclasses.dataclass(frozen=True)
class PublishPlan:
    """What a publish sends: `files` are (path in the repo, size in bytes), sorted."""

    repo_dir: Path
    repo_id: str
    branch: str
    message: str
    files: tuple[tuple[str, int], ...]

    def lines(self) -> list[str]:
        """The dry run's report, one line per file.

        >>> plan = PublishPlan(Path("k"), "org/k", "v1", "Publish k v1 with kernelhub", (("README.md", 12),))
        >>> print("\\n".join(plan.lines()))
        would publish k to org/k, branch v1 (created from main if missing)
        commit message: Publish k v1 with kernelhub
                12  README.md
        1 file, 12 bytes; dry run: nothing was uploaded
        """
        width = max((len(f"{size:,}") for _, size in self.files), default=1)
        total = sum(size for _, size in self.files)
        head = f"would publish {self.repo_dir} to {self.repo_id}, branch {self.branch} (created from main if missing)"
        return ([head,
                 f"commit message: {self.message}"]
                + [f"  {size:>{max(width, 8)},}  {path}" for path, size in self.files]
                + [f"{len(self.files)} file{'s' * (len(self.files) != 1)}, {total:,} bytes; "
                   "dry run: nothing was uploaded"])


def _target(repo_dir, repo_id: str, version: int | None) -> tuple[HubRef, dict, int]:
    """The checked repo id, build.toml's [general] and the version; no network, nothing written."""
    if not Path(repo_dir).is_dir():
        raise KernelhubError(f"kernel repo directory {str(repo_dir)!r} does not exist")
    ref = parse_hub_ref(repo_id, "--repo")
    if ref.symbol or ref.requested != "main":
        raise KernelhubError(f"--repo takes 'org/name' only, got {repo_id!r}; pass the version with --version")
    general = read_build_toml(repo_dir)
    version = general["version"] if version is None else version
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise KernelhubError(f"--version must be a positive integer, got {version!r}")
    return ref, general, version


def repo_files(repo_dir) -> tuple[tuple[str, int], ...]:
    """Every file a publish uploads, as (posix path in the repo, size), sorted: caches never, files the
    repo's .gitignore names neither, build/ always (see `kernelhub.kernel.ignore`). Symlinks are
    refused because a kernel consumer refuses them too."""
    files = []
    for rel, path in walk(repo_dir):
        if path.is_symlink():
            raise KernelhubError(f"{path} is a symlink; a kernel repo is published as plain files "
                                 "(kernelhub refuses variants with symlinks)")
        files.append((rel, path.stat().st_size))
    return tuple(files)


def plan_publish(repo_dir, repo_id: str, *, version: int | None = None, check: bool = True) -> PublishPlan:
    """Check and build `repo_dir`, then return what publishing it would upload; makes no request.

    >>> plan_publish("hub_kernels/rmsnorm", "my-org/rmsnorm").branch   # doctest: +SKIP
    'v1'
    """
    ref, general, version = _target(repo_dir, repo_id, version)
    if check:
        report = check_kernel(repo_dir)
        if not report.ok:
            raise KernelhubError(f"{repo_dir} fails `kernelhub kernel check`: {'; '.join(report.problems)}")
    build_kernel(repo_dir)
    branch = f"v{version}"
    return PublishPlan(Path(repo_dir), ref.repo_id, branch, f"Publish {general['name']} {branch} with kernelhub",
                       repo_files(repo_dir))


def _on_hub(step: str, api, plan: PublishPlan, call):
    """Run one Hub call; any failure becomes one HubKernelError naming the step and the endpoint."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return call()
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = " (is the token valid and allowed to write to this org?)" if status in (401, 403) else ""
        raise HubKernelError(f"publishing {plan.repo_id}: the Hub at {api.endpoint} refused to {step}: {why}{hint}. "
                             f"{_done(step)}") from e
    except Exception as e:  # noqa: BLE001 - transport errors (httpx, OSError, ...) are one clear line
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise HubKernelError(f"publishing {plan.repo_id}: cannot {step}: the Hub at {api.endpoint} is unreachable "
                             f"({why}). {_done(step)}; check the network or HF_ENDPOINT") from e


def _done(step: str) -> str:
    return "The commit may be incomplete" if step.startswith("commit") else "Nothing was uploaded"


def publish_kernel(repo_dir, repo_id: str, *, version: int | None = None, endpoint: str | None = None,
                   token: str | None = None, check: bool = True) -> str:
    """Upload `repo_dir` to `repo_id` on branch v<version>; returns the commit sha.

    Fails before any upload without a token (argument, `HF_TOKEN` or a saved login).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    _target(repo_dir, repo_id, version)  # bad arguments first: they need no token
    token = token or get_token()
    if not token:
        raise KernelhubError(f"publishing {repo_id} needs a Hugging Face token with write access: set HF_TOKEN or "
                             "run `hf auth login` (nothing was uploaded; --dry-run shows what would be)")
    plan = plan_publish(repo_dir, repo_id, version=version, check=check)
    api = HfApi(endpoint=endpoint, token=token)
    _on_hub("create the repo", api, plan, lambda: api.create_repo(plan.repo_id, repo_type="kernel", exist_ok=True))
    _on_hub(f"create branch {plan.branch}", api, plan, lambda: api.create_branch(
        plan.repo_id, branch=plan.branch, repo_type="kernel", exist_ok=True))
    # exactly the files the dry run lists, so the rehearsal cannot drift from the real thing
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(plan.repo_dir / path))
                  for path, _ in plan.files]
    info = _on_hub(f"commit to {plan.branch}", api, plan, lambda: api.create_commit(
        plan.repo_id, operations, commit_message=plan.message, repo_type="kernel", revision=plan.branch))
    return info.oid
