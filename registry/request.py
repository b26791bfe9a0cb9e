"""Parsing what users type for `attn_implementation` into per-site requests.

Accepted forms (DESIGN 2.4):

    "sdpa"                                   one explicit choice: an error if it cannot serve a site
    "paged|sdpa"                             sdpa, and the model will serve from a paged KV cache
    "org/repo@v1:my_attention"               an attention function from a Hub kernel repo
    ["flash", "sdpa"]                        a preference list: the first that fits, reasons recorded
    {"sliding_attention": "flex", "*": "sdpa"}   per layer type or module-path glob

Parsing happens once at bind time; nothing here runs during a forward.

>>> parse_attn_implementation("paged|sdpa").request_for("model.layers.0.self_attn.attn", "full_attention")
Request(names=('sdpa',), explicit=True, paged=True, origin="'paged|sdpa'")
"""

from __future__ import annotations

import dataclasses
import fnmatch

from kernelhub.registry.errors import BindError, KernelhubError
from kernelhub.registry.hub.ref import looks_like_kernel_ref, parse_kernel_ref

DEFAULT_PREFERENCE = ("sdpa", "eager")
# Layer types of transformers configs; valid dict keys even for models without such layers,
# so one request can serve many models.
KNOWN_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
FORMS = ("a backend name such as 'sdpa'", "'paged|NAME'", "a Hub kernel 'org/repo@rev:symbol'", "a preference list such as ['flex', 'sdpa']",
         "a dict such as {'sliding_attention': 'flex', '*': 'sdpa'}")


@dataclasses.dataclass(frozen=True)
class Request:
    """What one attention site asks for."""

    names: tuple[str, ...]
    explicit: bool
    paged: bool
    origin: str


def _bad(what: str) -> KernelhubError:
    return KernelhubError(f"invalid attn_implementation: {what}. Accepted forms: {'; '.join(FORMS)}")


def parse_name(text, origin: str) -> tuple[str, bool]:
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
        parse_kernel_ref(name, f"attn_implementation {origin}")  # shape only; loaded at bind time
    return name, paged


def parse_choice(value, origin: str) -> Request:
    """A single name or a preference list."""
    if isinstance(value, str):
        name, paged = parse_name(value, origin)
        return Request((name,), True, paged, f"{value!r}")
    if isinstance(value, (list, tuple)):
        if not value:
            raise _bad(f"{origin} is an empty preference list")
        parsed = [parse_name(v, f"{origin} entry {i}") for i, v in enumerate(value)]
        paged = {p for _, p in parsed}
        if len(paged) > 1:
            raise _bad(f"{origin} mixes 'paged|' and plain entries; mark all or none of them paged")
        return Request(tuple(n for n, _ in parsed), len(parsed) == 1, paged.pop(), repr(list(value)))
    raise _bad(f"{origin} must be a string or a list of strings, got {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    """A parsed attn_implementation: a rule mapping each site to a `Request`."""

    default: Request | None
    by_layer_type: dict
    by_path: tuple  # ((glob, Request), ...) in the user's order

    def request_for(self, path: str, layer_type: str) -> Request:
        parent = path.rsplit(".", 1)[0]
        for glob, req in self.by_path:
            if fnmatch.fnmatchcase(path, glob) or fnmatch.fnmatchcase(parent, glob):
                return req
        if layer_type in self.by_layer_type:
            return self.by_layer_type[layer_type]
        if self.default is not None:
            return self.default
        keys = [*self.by_layer_type, *(g for g, _ in self.by_path)]
        raise BindError(f"attn_implementation dict has no entry for attention site {path!r} (layer type "
                        f"{layer_type!r}); keys given: {', '.join(map(repr, keys))}. Add a '*' entry or the key "
                        f"{layer_type!r}")

    def requests(self) -> list[Request]:
        """Every request in the spec, so names can be validated even where no site uses them."""
        return [r for r in (self.default, *self.by_layer_type.values(), *(r for _, r in self.by_path)) if r]

    def check_keys(self, sites: dict) -> None:
        """Every dict key must match at least one site: a typo must not pass silently.

        `sites` maps module path -> layer type.
        """
        types = sorted(set(sites.values()) | set(KNOWN_LAYER_TYPES))
        for glob, _ in self.by_path:
            if not any(fnmatch.fnmatchcase(p, glob) or fnmatch.fnmatchcase(p.rsplit(".", 1)[0], glob) for p in sites):
                example = next(iter(sites), "model.layers.0.self_attn.attn")
                raise BindError(f"attn_implementation key {glob!r} matches no attention site. Keys are layer types "
                                f"({', '.join(types)}), '*', or module-path globs like {example!r}")


def parse_attn_implementation(spec, layer_types=()) -> AttnSpec:
    """Parse any accepted form; `layer_types` tells dict keys that are layer types from path globs."""
    if spec is None:
        return AttnSpec(Request(DEFAULT_PREFERENCE, False, False, "default"), {}, ())
    if isinstance(spec, dict):
        if not spec:
            raise _bad("the dict is empty")
        default, by_type, by_path = None, {}, []
        for key, value in spec.items():
            if not isinstance(key, str) or not key.strip():
                raise _bad(f"dict key {key!r} must be a layer type, '*' or a module-path glob")
            req = parse_choice(value, f"value for key {key!r}")
            req = dataclasses.replace(req, origin=f"{key!r}: {req.origin}")
            if key == "*":
                default = req
            elif key in layer_types or key in KNOWN_LAYER_TYPES:
                by_type[key] = req
            else:
                by_path.append((key, req))
        return AttnSpec(default, by_type, tuple(by_path))
    return AttnSpec(parse_choice(spec, "attn_implementation"), {}, ())
