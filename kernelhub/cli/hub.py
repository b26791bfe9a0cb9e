"""The Hub half of the command line: lock, download, kernel build|check|publish.

    kernelhub lock my-org/rmsnorm@v1 ./my-kernel [more refs] [--output kernelhub.lock]
    kernelhub lock --from-model CHECKPOINT        (the kernels its saved binding uses)
    kernelhub lock --check [--output kernelhub.lock]   (verify against the cache; imports nothing)
    kernelhub download [--lock kernelhub.lock]
    kernelhub kernel init DIR --layer RMSNorm
    kernelhub kernel build DIR | check DIR | publish DIR --repo org/name [--version N] [--dry-run]
"""

from __future__ import annotations

from pathlib import Path

from kernelhub.cli.args import UsageError, positive_int
from kernelhub.declare.errors import ConfigError
from kernelhub.registry.hub.lockfile import DEFAULT_NAME as DEFAULT_LOCK


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a directory, or unreadable: not a GGUF file; read_config says why
        return False


def saved_request(path) -> dict | None:
    """The binding request a saved model records (config.json's `kernelhub`), or None.

    A GGUF file has only llama.cpp metadata, so it records none (unless its derived config ever
    carries one); its metadata is still read and checked, so a damaged file is a clear error.
    """
    path = Path(path)
    if path.is_file() and _is_gguf(path):
        from kernelhub.checkpoint.gguf import read_gguf_config

        request = read_gguf_config(path).get("kernelhub")
    else:
        from kernelhub.checkpoint.hf_layout import read_config

        request = read_config(path).get("kernelhub")
    if request is not None and not isinstance(request, dict):
        raise ConfigError(f"{path}: the recorded kernelhub request is {type(request).__name__}; expected an object "
                          "with attn_implementation and kernels")
    return request


def refs_from_request(request: dict) -> list[str]:
    """The Hub refs and local directories in a recorded request (registered names are skipped).

    >>> refs_from_request({"attn_implementation": "sdpa", "kernels": {"RMSNorm": ["org/rms@v1", "reference"]}})
    ['org/rms@v1']
    """
    from kernelhub.registry.hub.ref import looks_like_kernel_ref

    kernels = request.get("kernels") or {}
    values = list(kernels.values()) if isinstance(kernels, dict) else []
    attn = request.get("attn_implementation")
    values += list(attn.values()) if isinstance(attn, dict) else [attn]
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    return [v for v in flat if isinstance(v, str) and looks_like_kernel_ref(v)]


def cmd_lock(args) -> int:
    from kernelhub.registry.hub.locking import check_lock, lock_kernels
    from kernelhub.registry.hub.lockfile import KernelLock

    output = Path(args.output)
    if args.check:
        lines, problems = check_lock(KernelLock.read(output))
        for line in lines:
            print(line)
        for problem in problems:
            print(f"PROBLEM  {problem}")
        print(f"{output}: {'does not match' if problems else 'matches'} the cache")
        return 1 if problems else 0
    refs = list(args.refs)
    if args.from_model:
        request = saved_request(args.from_model)
        found = refs_from_request(request) if request else []
        if not found:
            why = ("is a GGUF file, which records no kernelhub binding request" if _is_gguf(Path(args.from_model))
                   else "records no Hub or local kernel in its binding request")
            if not refs:
                raise UsageError(f"nothing to lock: {args.from_model} {why}; pass Hub refs like my-org/rmsnorm@v1 "
                                 "or local directories like ./my-kernel")
            print(f"{args.from_model} {why}; locking the refs given")
        refs += found
    if not refs:
        raise UsageError("nothing to lock: pass Hub refs like my-org/rmsnorm@v1, local directories like "
                         "./my-kernel, or --from-model CHECKPOINT")
    lock = lock_kernels(refs, KernelLock.read(output) if output.exists() else None, output)
    lock.write(output)
    for key, entry in sorted(lock.entries.items()):
        print(f"{key}: {entry.commit or 'local'}  variants: {', '.join(sorted(entry.variants))}")
    print(f"wrote {output}")
    return 0


def cmd_download(args) -> int:
    from kernelhub.registry.hub.locking import download_locked
    from kernelhub.registry.hub.lockfile import KernelLock

    for line in download_locked(KernelLock.read(args.lock)):
        print(line)
    return 0


def cmd_kernel_init(args) -> int:
    from kernelhub.kernel.ignore import walk
    from kernelhub.kernel.init import init_kernel

    repo = init_kernel(args.dir, args.layer)
    print(f"wrote {args.layer} kernel repo {repo}:")
    for rel, _ in walk(repo):
        print(f"  {rel}")
    print(f"next: (cd {repo} && python -m pytest tests); kernelhub kernel check {repo}; "
          f"kernelhub kernel publish {repo} --repo ORG/{repo.name} --dry-run")
    return 0


def cmd_kernel_build(args) -> int:
    from kernelhub.kernel.build import build_kernel

    for variant in build_kernel(args.dir):
        print(f"built {variant}")
    return 0


def cmd_kernel_check(args) -> int:
    from kernelhub.kernel.check import check_kernel

    report = check_kernel(args.dir)
    for line in report.lines:
        print(f"ok       {line}")
    for note in report.notes:
        print(f"note     {note}")
    for problem in report.problems:
        print(f"PROBLEM  {problem}")
    return 0 if report.ok else 1


def cmd_kernel_publish(args) -> int:
    from kernelhub.kernel.build import read_build_toml
    from kernelhub.kernel.publish import plan_publish, publish_kernel

    if args.dry_run:
        for line in plan_publish(args.dir, args.repo, version=args.version).lines():
            print(line)
        return 0
    commit = publish_kernel(args.dir, args.repo, version=args.version)
    version = args.version or read_build_toml(args.dir)["version"]
    print(f"published {args.repo} at {commit}; lock it with: kernelhub lock {args.repo}@v{version}")
    return 0


def add_hub_commands(sub, subcommand, common) -> None:
    """Add lock, download and kernel {build,check,publish} to the `kernelhub` subparsers."""
    parents = [common]
    p = subcommand(sub, "lock", "pin kernels and their dependencies (commit + sha256 of every file) in a lock file",
                   "Offline: pins what is in the Hugging Face cache; local directories lock too.\n"
                   "examples: kernelhub lock my-org/rmsnorm@v1 ./my-kernel\n"
                   "          kernelhub lock --check", parents)
    p.add_argument("refs", nargs="*", metavar="REF",
                   help="Hub kernel refs (my-org/rmsnorm@v1) or local directories (./dir, /abs/dir, ~/dir)")
    p.add_argument("--from-model", default=None, metavar="CHECKPOINT",
                   help="also lock the kernels a saved checkpoint's binding request uses")
    p.add_argument("--check", action="store_true", help="verify the lock against the cache and local "
                                                        "directories, without importing anything")
    p.add_argument("--output", "-o", default=DEFAULT_LOCK, metavar="FILE",
                   help="the lock file to write or check (default: %(default)s)")
    p.set_defaults(fn=cmd_lock)
    p = subcommand(sub, "download", "prefetch and verify every kernel in a lock file", parents=parents)
    p.add_argument("--lock", default=DEFAULT_LOCK, metavar="FILE", help="the lock file (default: %(default)s)")
    p.set_defaults(fn=cmd_download)

    p = subcommand(sub, "kernel", "start, build, check or publish a kernel repo (see hub_kernels/)",
                   "run `kernelhub kernel ACTION --help` for each action's options", parents)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    dir_help = "the kernel repo directory (build.toml, torch-ext/, ...)"
    from kernelhub.kernel.init import TEMPLATES

    p = subcommand(actions, "init", "write a new kernel repo for a declared layer, ready to build, check and "
                   "publish", "The folder's name is the kernel's name (lowercase letters, digits, dashes).\n"
                   "example: kernelhub kernel init my-rmsnorm --layer RMSNorm", parents)
    p.add_argument("dir", metavar="DIR", help="the new folder (must not exist, or be empty)")
    p.add_argument("--layer", required=True, choices=sorted(TEMPLATES),
                   help="the declared layer the kernel implements; one of: %(choices)s")
    p.set_defaults(fn=cmd_kernel_init)
    p = subcommand(actions, "build", "write build/torch-<backend>/ for every backend in build.toml",
                   parents=parents)
    p.add_argument("dir", metavar="DIR", help=dir_help)
    p.set_defaults(fn=cmd_kernel_build)
    p = subcommand(actions, "check", "check a kernel repo's layout, metadata, layer contract and numbers",
                   "Builds a scratch copy; the repo itself is not written.", parents)
    p.add_argument("dir", metavar="DIR", help=dir_help)
    p.set_defaults(fn=cmd_kernel_check)
    p = subcommand(actions, "publish", "check, build and upload a kernel repo to the v<N> branch of a Hub repo",
                   "Needs a token (HF_TOKEN or `hf auth login`); --dry-run needs none and makes no request.\n"
                   "example: kernelhub kernel publish ./my-rmsnorm --repo my-org/my-rmsnorm --dry-run", parents)
    p.add_argument("dir", metavar="DIR", help=dir_help)
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub repo id to publish to")
    p.add_argument("--version", type=positive_int, default=None, metavar="N",
                   help="publish to branch v<N> (default: version in build.toml)")
    p.add_argument("--dry-run", action="store_true",
                   help="check and build, then list every file, the branch and the commit message; upload nothing")
    p.set_defaults(fn=cmd_kernel_publish)
