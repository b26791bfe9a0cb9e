"""Two processes filling one cold verified store with the same kernel at the same moment: each
gets a complete copy, and no copy is replaced or deleted while the other may be using it."""

import multiprocessing
import os
from pathlib import Path

ROUNDS = 40
FILES = {f"pkg/mod_{i}.py": (f"X = {i}\n" * 2000).encode() for i in range(24)} | {"metadata.json": b'{"name": "pkg"}'}


def fill(root: str, rounds: int, barrier, results) -> None:
    """One process: per round, publish into a fresh store at the same moment as the other, then
    check that the copy it got is whole and still the same directory once both are done."""
    from kernelhub.registry.hub.snapshot import Snapshot
    from kernelhub.registry.hub.store import verified_copy

    snapshot = Snapshot(Path("race"), dict(FILES))
    failures = []
    for i in range(rounds):
        os.environ["KERNELHUB_CACHE"] = os.path.join(root, f"round-{i}")
        barrier.wait(timeout=60)
        try:
            copy = verified_copy(snapshot)
            inode = os.stat(copy).st_ino
            held = {rel: (copy / rel).read_bytes() for rel in FILES}
            barrier.wait(timeout=60)  # the other process has finished its verified_copy too
            if held != FILES:
                failures.append(f"round {i}: the copy's bytes differ")
            if os.stat(copy).st_ino != inode or {rel: (copy / rel).read_bytes() for rel in FILES} != FILES:
                failures.append(f"round {i}: {copy} was replaced while in use")
        except Exception as e:  # noqa: BLE001 - reported to the test
            failures.append(f"round {i}: {type(e).__name__}: {e}")
            barrier.abort()
            break
    results.put(failures)


def test_two_processes_fill_one_cold_store_forty_times_without_a_failure(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=fill, args=(str(tmp_path), ROUNDS, barrier, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    failures = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
    assert failures == [[], []]
    leftovers = [p for p in tmp_path.glob("round-*/verified/*") if p.name.startswith(".")]
    assert not leftovers, f"temporary folders left behind: {leftovers[:3]}"
    assert all(len(list(tmp_path.glob(f"round-{i}/verified/*"))) == 1 for i in range(ROUNDS))
