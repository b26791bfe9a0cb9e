"""`Resolution`: what serves a backend on one device and dtype, decided at bind time.

A backend whose implementation depends on the machine (flash: flash-attn on CUDA, a Triton
kernel elsewhere) declares `resolve(device, dtype) -> Resolution`.

>>> Resolution(note="Triton kernel").problems
()
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Resolution:
    """What serves a backend on one device and dtype, decided at bind time: the function for
    plain forwards, the one for paged-cache forwards, a note for the plan, or the problems
    that leave nothing to serve it. `no_sinks` / `no_sinks_compiled`: why the chosen
    implementation cannot take attention sinks (always / under torch.compile), where its
    backend otherwise declares them."""

    fn: object = None
    paged_fn: object = None
    note: str = ""
    problems: tuple[str, ...] = ()
    no_sinks: str = ""
    no_sinks_compiled: str = ""
