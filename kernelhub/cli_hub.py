"""The Hub half of the command line: lock, download, kernel build|check|publish.

    kernelhub lock my-org/rmsnorm@v1 ./my-kernel [more refs] [--output kernelhub.lock]
    kernelhub lock --from-model CHECKPOINT        (the kernels its saved binding uses)
    kernelhub lock --check [--output kernelhub.lock]   (verify against the cache; imports nothing)
    kernelhub download [--lock kernelhub.lock]
    kernelhub kernel build DIR | check DIR | publish DIR --repo org/name [--version N]
"""

from __future__ import annotations

from pathlib import Path

from kernelhub.registry.hub.lockfile import DEFAULT_NAME


def _refs_from_model(path) -> list[str]:
    from kernelhub.models.checkpoint import read_config
    from kernelhub.registry.hub.ref import looks_like_kernel_ref

    request = read_config(path).get("kernelhub") or {}
    values = list((request.get("kernels") or {}).values())
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
    refs = list(args.refs) + (_refs_from_model(args.from_model) if args.from_model else [])
    if not refs:
        print("error: nothing to lock: pass Hub refs like my-org/rmsnorm@v1, local directories like ./my-kernel, "
              "or --from-model CHECKPOINT")
        return 2
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


def cmd_kernel(args) -> int:
    if args.action == "build":
        from kernelhub.kernel_build import build_kernel

        for variant in build_kernel(args.dir):
            print(f"built {variant}")
        return 0
    if args.action == "check":
        from kernelhub.kernel_check import check_kernel

        report = check_kernel(args.dir)
        for line in report.lines:
            print(f"ok       {line}")
        for problem in report.problems:
            print(f"PROBLEM  {problem}")
        return 0 if report.ok else 1
    from kernelhub.kernel_publish import publish_kernel

    if not args.repo:
        print("error: publish needs --repo org/name")
        return 2
    commit = publish_kernel(args.dir, args.repo, version=args.version)
    print(f"published {args.repo} at {commit}; lock it with: kernelhub lock {args.repo}@v{args.version or 'N'}")
    return 0


def add_hub_commands(sub) -> None:
    p = sub.add_parser("lock", help="pin kernels and their dependencies (commit + sha256 of every file) "
                                    "in kernelhub.lock; offline, pins what is in the cache")
    p.add_argument("refs", nargs="*", help="Hub kernel refs (my-org/rmsnorm@v1) or local directories (./dir)")
    p.add_argument("--from-model", default=None, help="lock the kernels a saved checkpoint binds")
    p.add_argument("--check", action="store_true", help="verify the lock against the cache and local "
                                                        "directories, without importing anything")
    p.add_argument("--output", "-o", default=DEFAULT_NAME)
    p.set_defaults(fn=cmd_lock)
    p = sub.add_parser("download", help="prefetch and verify every kernel in a lock file")
    p.add_argument("--lock", default=DEFAULT_NAME)
    p.set_defaults(fn=cmd_download)
    p = sub.add_parser("kernel", help="build, check or publish a kernel repo (see hub_kernels/)")
    p.add_argument("action", choices=["build", "check", "publish"])
    p.add_argument("dir", help="the kernel repo directory (build.toml, torch-ext/, ...)")
    p.add_argument("--repo", default=None, help="publish: the Hub repo id, org/name")
    p.add_argument("--version", type=int, default=None, help="publish: the v<N> branch (default: build.toml)")
    p.set_defaults(fn=cmd_kernel)
