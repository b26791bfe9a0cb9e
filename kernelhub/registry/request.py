"""One grammar for what users ask: `attn_implementation=` and `kernels=` parse the same way.

Both become a `Request`: candidate chains keyed by name (a layer type for attention, a
layer name for kernels), by module-path glob, or `'*'` for everything else.

    attn_implementation = "sdpa"                      one explicit choice: an error if it cannot serve
                        = "paged|sdpa"                ... and the model will serve from a paged KV cache
                        = "org/repo@v1:my_attention"  an attention function from a Hub kernel repo
                        = ["flash", "sdpa"]           a preference list: the first that fits, reasons recorded
                        = {"sliding_attention": "flex", "model.layers.0.*": "eager", "*": "sdpa"}
    kernels = {"RMSNorm": MyRMSNorm | "fast" | "org/rmsnorm@v1" | "./dir" | ["org/x@v1", "reference"],
               "model.layers.0.*": "./dir:RMSNorm"}

One precedence: the first glob (in the order written) that matches, then the name, then
`'*'`. One glob rule (`glob_matches`): a glob matches a module's path or the path of a
module it sits in. Nothing is loaded here; `choose` does that.

>>> req = parse_attn_implementation({"sliding_attention": "flex", "*": "sdpa"}, ["sliding_attention"])
>>> req.lookup("model.layers.1.self_attn.attn", "sliding_attention")[1].values
('flex',)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

from kernelhub.declare.errors import KernelhubError, suggestion
from kernelhub.registry.hub.ref import looks_like_kernel_ref, parse_kernel_ref

DEFAULT_PREFERENCE = ("sdpa", "eager")
REFERENCE = "reference"
# Layer types of transformers configs; valid dict keys even for models without such layers,
# so one request can serve many models.
KNOWN_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
AttnImplementation = str | Sequence[str] | Mapping[str, str | Sequence[str]]
"""What `attn_implementation=` accepts: a name or Hub ref, a preference list, or a dict of either."""
KernelValue = str | os.PathLike | type | None
"""One `kernels=` value: a registered name, a Hub ref, './dir', a class, or 'reference' (None)."""
Kernels = Mapping[str, KernelValue | Sequence[KernelValue]]
"""What `kernels=` accepts: layer name or module-path glob -> a kernel or a fallback chain."""

FORMS = ("a backend name such as 'sdpa'", "'paged|NAME'", "a Hub kernel 'org/repo@rev:symbol'",
         "a preference list such as ['flex', 'sdpa']", "a dict such as {'sliding_attention': 'flex', '*': 'sdpa'}")


@dataclasses.dataclass(frozen=True)
class Chain:
    """What one key asks for: candidates in preference order."""

    values: tuple
    explicit: bool      # a single value, not a list: if it cannot serve, that is an error
    origin: str         # as the user wrote it, for the plan
    paged: bool = False  # attention: the model will serve from a paged KV cache


@dataclasses.dataclass(frozen=True)
class Request:
    """A parsed `attn_implementation` or `kernels`: a rule from (path, name) to a `Chain`."""

    default: Chain | None
    by_name: dict
    by_glob: tuple  # ((glob, Chain), ...) in the user's order

    def lookup(self, path: str, name: str, applies: Callable[[str, Chain], bool] | None = None
               ) -> tuple[str | None, Chain | None]:
        """(key, chain) for the module at `path` declared as `name`; (None, None) if nothing asks.

        `applies(key, chain)` may veto a glob's chain for this module (a kernel for another layer).
        """
        for glob, chain in self.by_glob:
            if glob_matches(glob, path) and (applies is None or applies(glob, chain)):
                return glob, chain
        if name in self.by_name:
            return name, self.by_name[name]
        if self.default is not None:
            return "*", self.default
        return None, None

    def chains(self) -> list[tuple[str, Chain]]:
        return [*self.by_name.items(), *self.by_glob, *((("*", self.default),) if self.default else ())]


def glob_matches(glob: str, path: str) -> bool:
    """Whether a module-path glob matches `path` or the path of a module it sits in.

    >>> glob_matches("model.layers.0.self_attn", "model.layers.0.self_attn.attn")
    True
    >>> glob_matches("model.layers.1*", "model.layers.0.mlp")
    False
    """
    parts = path.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), glob) for i in range(len(parts), 0, -1))


def _bad(what: str) -> KernelhubError:
    return KernelhubError(f"invalid attn_implementation: {what}. Accepted forms: {'; '.join(FORMS)}")


def _attention_name(text: object, origin: str) -> tuple[str, bool]:
    """('name', paged) from one string, checking its shape (not whether it is registered)."""
    if not isinstance(text, str):
        raise _bad(f"{origin} must be a string, got {type(text).__name__} {text!r}")
    name, paged = text.strip(), False
    if name.startswith("paged|"):
        name, paged = name[len("paged|"):].strip(), True
    if not name:
        raise _bad(f"{origin} is an empty name")
    if "|" in name:
        raise _bad(f"{origin} {text!r} has an unknown prefix; only 'paged|' is understood")
    if looks_like_kernel_ref(name):
        where = origin if origin.startswith("attn_implementation") else f"attn_implementation {origin}"
        parse_kernel_ref(name, where)  # shape only; loaded at bind time
    return name, paged


def _attention_chain(value: object, origin: str) -> Chain:
    if isinstance(value, str):
        name, paged = _attention_name(value, origin)
        return Chain((name,), True, repr(value), paged)
    if isinstance(value, (list, tuple)):
        if not value:
            raise _bad(f"{origin} is an empty preference list")
        parsed = [_attention_name(v, f"{origin} entry {i}") for i, v in enumerate(value)]
        paged = {p for _, p in parsed}
        if len(paged) > 1:
            raise _bad(f"{origin} mixes 'paged|' and plain entries; mark all or none of them paged")
        return Chain(tuple(n for n, _ in parsed), False, repr(list(value)), paged.pop())
    raise _bad(f"{origin} must be a string or a list of strings, got {type(value).__name__}")


def parse_attn_implementation(value: AttnImplementation | None, layer_types: Iterable[str] = ()) -> Request:
    """Parse any accepted form; `layer_types` tells dict keys that are layer types from path globs."""
    if value is None:
        return Request(Chain(DEFAULT_PREFERENCE, False, "default"), {}, ())
    if not isinstance(value, dict):
        return Request(_attention_chain(value, "attn_implementation"), {}, ())
    if not value:
        raise _bad("the dict is empty")
    default, by_name, by_glob = None, {}, []
    for key, item in value.items():
        if not isinstance(key, str) or not key.strip():
            raise _bad(f"dict key {key!r} must be a layer type, '*' or a module-path glob")
        chain = _attention_chain(item, f"value for key {key!r}")
        chain = dataclasses.replace(chain, origin=f"{key!r}: {chain.origin}")
        if key == "*":
            default = chain
        elif key in layer_types or key in KNOWN_LAYER_TYPES:
            by_name[key] = chain
        else:
            by_glob.append((key, chain))
    return Request(default, by_name, tuple(by_glob))


def _kernel_value_ok(value: object) -> bool:
    return isinstance(value, (str, os.PathLike)) or value is None or callable(value)


def parse_kernels(value: Kernels | None, layer_names: Iterable[str]) -> Request:
    """Parse `kernels=`: keys are declared layer names or module-path globs; values a kernel or a chain."""
    if value is None:
        return Request(None, {}, ())
    names = sorted(layer_names)
    if not isinstance(value, dict):
        raise KernelhubError(f"kernels must be a dict like {{'RMSNorm': impl}}, got {type(value).__name__}")
    by_name, by_glob = {}, []
    for key, item in value.items():
        if not isinstance(key, str) or not key.strip():
            raise KernelhubError(f"kernels key {key!r} must be a layer name ({', '.join(names)}) or a module-path glob")
        if key not in names and "." not in key and not any(c in key for c in "*?["):
            raise KernelhubError(f"kernels key {key!r} names no declared layer of this model.{suggestion(key, names)} "
                                 f"Layers: {', '.join(names) or 'none'}; or use a module-path glob")
        chain = list(item) if isinstance(item, (list, tuple)) else [item]
        if not chain:
            raise KernelhubError(f"kernels[{key!r}] is an empty fallback chain")
        bad = [v for v in chain if not _kernel_value_ok(v)]
        if bad:
            raise KernelhubError(f"kernels[{key!r}]: {bad[0]!r} breaks the layer contract: give a class with "
                                 "forward(self, x) "
                                 "(like the kernels `layers.<Name>` classes), a registered kernel name, a Hub ref "
                                 "'org/name@rev', a local directory './dir', or 'reference'")
        origin = repr(item if isinstance(item, (str, list)) else getattr(item, "__name__", item))
        parsed = Chain(tuple(REFERENCE if v is None else v for v in chain), not isinstance(item, (list, tuple)),
                       f"{key!r}: {origin}")
        if key in names:
            by_name[key] = parsed
        else:
            by_glob.append((key, parsed))
    return Request(None, by_name, tuple(by_glob))
