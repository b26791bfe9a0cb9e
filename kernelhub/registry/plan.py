"""`BindingPlan`: what kernelhub chose for every site of a model, and why.

Immutable, and true: a layer whose forward was replaced after binding (by
`kernels.kernelize`, say) shows as replaced, naming what runs there now. `str(plan)` is a
table; `plan.to_dict()` is plain data for tools and tests.

>>> entry = PlanEntry("model.layers.0.self_attn.attn", "attention", "sdpa", "builtin", "'sdpa'",
...                   (("eager", ("not tried",)),))
>>> plan = BindingPlan((entry,), device="cpu", dtype="float32", mode="inference")
>>> plan.to_dict()[0]["chosen"]
'sdpa'
"""

from __future__ import annotations

import dataclasses
import re
import weakref
from collections.abc import Iterable, Iterator

import torch

from kernelhub.registry.modes import ModeLike
from kernelhub.registry.request import AttnImplementation, Kernels


@dataclasses.dataclass(frozen=True)
class PlanEntry:
    """One bound site: its module path, what runs there, where it came from, what was rejected."""

    path: str
    kind: str  # "attention" | "layer"
    chosen: str
    source: str
    request: str
    rejected: tuple = ()  # ((name, (reason, ...)), ...)
    note: str = ""
    sharding: str = ""  # under tensor parallelism: how this module is split on this rank

    def to_dict(self) -> dict:
        out = {
            "path": self.path, "kind": self.kind, "chosen": self.chosen, "source": self.source,
            "request": self.request, "note": self.note,
            "rejected": [{"name": n, "reasons": list(r)} for n, r in self.rejected],
        }
        if self.sharding:
            out["sharding"] = self.sharding
        return out


@dataclasses.dataclass(frozen=True)
class BindRequest:
    """Everything a bind was asked, kept so a re-check (a move, `use_kernels`) asks the same."""

    attn_implementation: AttnImplementation | None = None
    kernels: Kernels | None = None
    mode: ModeLike = "inference"
    lock: object = None  # a KernelLock, a path, or None
    verify: bool = True


class BindingPlan:
    """The binding of one model: an entry per attention site and per declared layer."""

    def __init__(self, entries: Iterable[PlanEntry], *, device: str, dtype: str, mode: ModeLike,
                 request: BindRequest | None = None,
                 watch: Iterable[tuple[int, torch.nn.Module, object]] = (), tensor_parallel: dict | None = None
                 ) -> None:
        self._entries = tuple(entries)
        self.device, self.dtype, self.mode = device, dtype, str(mode)
        # {tp_size, rank, plan, modules: {path: {style, params}}, attention: {path: heads}} or None
        self.tensor_parallel = tensor_parallel
        self.request = request or BindRequest(mode=mode)
        # (entry index, module, forward installed or None): what to compare with what runs now
        self._watch = tuple((i, weakref.ref(m), f) for i, m, f in watch)

    notes: tuple = ()  # lines shown under the table (what a load held back, say)

    def noting(self, line: str) -> "BindingPlan":
        """This plan with one more note."""
        plan = BindingPlan(self._entries, device=self.device, dtype=self.dtype, mode=self.mode, request=self.request,
                           tensor_parallel=self.tensor_parallel)
        plan._watch, plan.notes = self._watch, (*self.notes, line)
        return plan

    def watching(self, layers: Iterable[tuple[torch.nn.Module, object]]) -> "BindingPlan":
        """This plan, keeping what binding left in each layer's `forward` attribute ((module, _) pairs in
        entry order), so a forward replaced afterwards shows as replaced."""
        first = sum(1 for e in self._entries if e.kind == "attention")
        watch = tuple((first + i, m, m.__dict__.get("forward")) for i, (m, _) in enumerate(layers))
        plan = BindingPlan(self._entries, device=self.device, dtype=self.dtype, mode=self.mode, request=self.request,
                           watch=watch, tensor_parallel=self.tensor_parallel)
        plan.notes = self.notes
        return plan

    @property
    def entries(self) -> tuple[PlanEntry, ...]:
        """The entries, with any layer whose forward was replaced outside kernelhub shown as such."""
        entries = list(self._entries)
        for index, ref, installed in self._watch:
            module = ref()
            running = module.__dict__.get("forward") if module is not None else None
            if module is None or running is installed:
                continue
            func = getattr(running, "__func__", running)
            what = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', repr(func))}" \
                if running is not None else "the model's own forward"
            entry = entries[index]
            entries[index] = dataclasses.replace(entry, chosen="replaced outside kernelhub", source=what,
                                                 note=f"bound {entry.chosen}")
        return tuple(entries)

    def __getitem__(self, path: str) -> PlanEntry:
        for e in self.entries:
            if e.path == path:
                return e
        raise KeyError(f"no site {path!r} in this plan; paths: {', '.join(e.path for e in self.entries[:6])}, ...")

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def chosen(self, kind: str = "attention") -> set[str]:
        """The distinct implementations chosen for sites of `kind`."""
        return {e.chosen for e in self.entries if e.kind == kind}

    def to_dict(self) -> list[dict]:
        return [e.to_dict() for e in self.entries]

    def __str__(self) -> str:
        rows = [("path", "kind", "chosen", "source", "rejected")]
        for e in _collapse(self.entries):
            rejected = "; ".join(f"{n}: {', '.join(r)}" for n, r in e.rejected) or "-"
            rows.append((e.path, e.kind, e.chosen, e.source + (f" ({e.note})" if e.note else ""), rejected))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        tp = self.tensor_parallel
        where = f", tensor parallel: rank {tp['rank']} of {tp['tp_size']}" if tp else ""
        lines = [f"BindingPlan(device={self.device}, dtype={self.dtype}, mode={self.mode}{where})"]
        for i, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  --------")
        return "\n".join(lines + self._sharding_lines() + [f"note: {n}" for n in self.notes])

    def _sharding_lines(self) -> list[str]:
        """Per module (layers collapsed), how it is split on this rank: every sharded module, declared
        layer or not (the embedding is not a declared layer), and every attention site's heads."""
        if not self.tensor_parallel:
            return []
        described = {e.path: e.sharding for e in self.entries if e.sharding}
        for path in self.tensor_parallel["modules"]:
            described.setdefault(path, self.tensor_parallel["modules"][path]["description"])
        collapsed = _collapse([PlanEntry(p, "", "", "", "", (), s) for p, s in described.items()])
        width = max(len(e.path) for e in collapsed)
        return ["", "sharding:"] + [f"  {e.path.ljust(width)}  {e.note}" for e in collapsed]

    __repr__ = __str__


def _collapse(entries):
    """Merge runs of layers that differ only by their index: model.layers.{0..31}.self_attn.attn."""
    groups: dict = {}
    for e in entries:
        pattern = re.sub(r"\.(\d+)\.", ".{i}.", e.path, count=1)
        key = (pattern, e.kind, e.chosen, e.source, e.rejected, e.note)
        index = re.search(r"\.(\d+)\.", e.path)
        groups.setdefault(key, []).append(index.group(1) if index else None)
    out = []
    for (pattern, kind, chosen, source, rejected, note), idx in groups.items():
        if len(idx) > 1 and None not in idx:
            path = pattern.replace("{i}", "{" + _ranges([int(i) for i in idx]) + "}")
        else:
            path = pattern.replace("{i}", idx[0]) if idx[0] is not None else pattern
        out.append(PlanEntry(path, kind, chosen, source, "", rejected, note))
    return out


def _ranges(nums) -> str:
    nums, parts, start = sorted(nums), [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}..{n}")
            start = None
    return ",".join(parts)
