"""Run a function in several threads at once and report their failures in the calling thread."""

import threading


def run_in_threads(worker, n: int = 8) -> None:
    """Call worker(i) for i in range(n), each in its own thread, all released together."""
    errors, start = [], threading.Barrier(n)

    def run(i):
        try:
            start.wait(timeout=10)
            worker(i)
        except Exception as e:  # noqa: BLE001 - re-raised below, in the calling thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
