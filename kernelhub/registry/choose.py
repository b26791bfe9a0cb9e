"""One chooser for attention sites and declared layers: candidates in, a `PlanEntry` out.

Every candidate of a chain is loaded (a registered backend or layer kernel, a Hub or local
kernel, an in-process class) and checked; one that cannot load or cannot serve is a
recorded rejection with its reasons. The first that fits is chosen (for attention, a
plugin's selection hook may pick another fitting one). When none fits, one error names
the site, the machine, the mode and every reason. Refusals that protect the user (an
untrusted repo, a lock mismatch, a variant holding bytecode or symlinks) and malformed
input are raised at once, never turned into a quiet fallback.

>>> no_fit("layer", "m.norm", None, Chain(("mine",), True, "'mine'"), [("mine", ("too slow",))],
...        "cpu", "float32", "inference").args[0].startswith("'mine' cannot serve layer 'm.norm'")
True
"""

from __future__ import annotations

import dataclasses
import logging

from kernelhub.declare.errors import BindError
from kernelhub.registry.plan import PlanEntry
from kernelhub.registry.request import Chain

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Option:
    """A loaded candidate: what it is called, where it came from, and what it carries."""

    name: str
    source: str
    payload: object = None          # a Registered backend, or a layer kernel class (None: the reference)
    problems: tuple = ()            # found while loading: it cannot serve anywhere
    caps: object = None             # Capabilities, for layer kernels
    note: str = ""                  # for the plan entry (how long verifying a Hub kernel took, say)


def choose(kind: str, path: str, key, chain: Chain, load, reasons, *, device, dtype, mode, pick=None, valid=""):
    """(PlanEntry, Option) for one site or layer from `chain`, or `BindError` listing every reason.

    `load(value) -> Option` raises only for bad input or a refusal (`kernelhub.declare.errors.REFUSALS`); a kernel
that failed to load comes back with `problems`. `reasons(option) -> [str]`.
`pick(fitting) -> Option`: choose among all that fit (default: the first, and stop there).
    """
    fitting, rejected = [], []
    for value in chain.values:
        option = load(value)
        why = list(option.problems) or reasons(option)
        if why:
            rejected.append((option.name, tuple(why)))
            logger.debug("%s %s: %s rejected: %s", kind, path, option.name, "; ".join(why))
        else:
            fitting.append(option)
            if pick is None:
                break  # first fit wins: later candidates are not even loaded
    if not fitting:
        raise no_fit(kind, path, key, chain, rejected, device, dtype, mode, valid)
    chosen = pick(fitting) if pick else fitting[0]
    note = "; ".join(n for n in ("selected by policy hook" if chosen is not fitting[0] else "", chosen.note) if n)
    logger.debug("%s %s: %s (%s)%s", kind, path, chosen.name, chosen.source, f", {note}" if note else "")
    return PlanEntry(path, kind, chosen.name, chosen.source, chain.origin, tuple(rejected), note), chosen


def no_fit(kind, path, key, chain: Chain, rejected, device, dtype, mode, valid: str = "") -> BindError:
    """The one error for a site or layer that no candidate can serve."""
    detail = "; ".join(f"{name}: {', '.join(why)}" for name, why in rejected)
    label = lambda v: repr(v) if isinstance(v, str) else repr(getattr(v, "__name__", v))  # noqa: E731 - a class by name
    names = ", ".join(map(label, chain.values))
    what = f"{label(chain.values[0])} cannot" if chain.explicit else f"none of [{names}] can"
    where = f"{str(device).split(':')[0]}/{str(dtype).removeprefix('torch.')} in {mode} mode"
    hint = f". {valid}" if valid else ""
    if kind == "layer":
        hint += ". Add 'reference' to the chain to fall back to the model's own forward"
    asked = f" (asked by {'kernels' if kind == 'layer' else 'attn_implementation'}[{key!r}])" if key else ""
    return BindError(f"{what} serve {kind} {path!r}{asked} on {where}: {detail}{hint}")
