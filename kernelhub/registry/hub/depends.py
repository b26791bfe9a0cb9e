"""The rules of a kernel's dependency graph (`kernel-depends`), shared by binding and locking.

A graph is walked once per bind and once per `kernelhub lock`: every kernel in it is
fetched, read, hashed and checked once, however many kernels depend on it (a "diamond" of
14 levels, two kernels each depending on both of the next level, is 28 reads, not 16,383).
A chain deeper than `MAX_DEPTH` or one that comes back to a kernel already on it is an
error naming the chain.

>>> check_edge(("a/x@v1",), "a/y@v1")
>>> check_edge(("a/x@v1", "a/y@v1"), "a/x@v1")
Traceback (most recent call last):
kernelhub.declare.errors.HubKernelError: a/x@v1 -> a/y@v1 -> a/x@v1: a dependency cycle
"""

from __future__ import annotations

from kernelhub.declare.errors import HubKernelError

MAX_DEPTH = 32  # kernels on one dependency chain, the first included; real ones have two or three


def chain_text(chain) -> str:
    """'a -> b -> c', the middle elided past eight kernels."""
    chain = list(chain)
    if len(chain) > 8:
        chain = [*chain[:3], f"... ({len(chain) - 5} more)", *chain[-2:]]
    return " -> ".join(chain)


def check_edge(chain: tuple, dep: str) -> None:
    """Refuse following `chain` (labels from the kernel asked for) to its dependency `dep`."""
    if dep in chain:
        raise HubKernelError(f"{chain_text((*chain, dep))}: a dependency cycle")
    if len(chain) >= MAX_DEPTH:
        raise HubKernelError(f"{chain_text((*chain, dep))}: kernel-depends nests deeper than {MAX_DEPTH} kernels; "
                             "a kernel's dependency chain must be at most that long")
