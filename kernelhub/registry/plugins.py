"""The plugin registry: which backends, layer kernels and architectures exist.

One `Registry` per scope. The process-wide one is built on first use: built-ins first,
then every entry point in the group `kernelhub` (unless
`KERNELHUB_DISABLE_PLUGIN_AUTOLOAD=1`). A plugin that fails to load is recorded in
`failures` (listed by `kernelhub plugins`) and logged at WARNING with its traceback at
DEBUG, never swallowed. `scoped_registry()` swaps in a copy for the current context (a
`ContextVar`, so threads and asyncio tasks are isolated).

>>> with scoped_registry() as reg:
...     "sdpa" in reg.backend_names()
True
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib.metadata
import logging
import os
import threading
from collections.abc import Iterator

import pluggy

from kernelhub.registry import builtins, hookspecs
from kernelhub.registry.capabilities import MASK_FORMATS, AttentionBackend
from kernelhub.declare import log as _log  # noqa: F401 - configures the "kernelhub" logger before any failure
from kernelhub.declare.errors import RegistrationError, UnknownBackendError, closest_first, suggestion

ENTRY_POINT_GROUP = "kernelhub"
# transformers' attn_implementation spellings, mapped to the backend name they mean here.
# They resolve to whichever backend is registered under that name (a plugin's, say).
TRANSFORMERS_SPELLINGS = {"flash_attention_2": "flash", "flash_attention_3": "flash", "flex_attention": "flex"}
AUTOLOAD_ENV = "KERNELHUB_DISABLE_PLUGIN_AUTOLOAD"

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or registered, and why."""

    plugin: str
    error: str


@dataclasses.dataclass(frozen=True)
class Registered:
    """A backend together with the plugin that provided it."""

    backend: AttentionBackend
    source: str


class Registry:
    """Backends, layer kernels and model architectures, fed by pluggy hooks."""

    def __init__(self, *, autoload: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self._lock = threading.RLock()
        self._backends: dict[str, Registered] = {}
        self._aliases: dict[str, str] = {}
        self.layer_kernels: dict[str, dict[str, object]] = {}
        self.layer_kernel_sources: dict[tuple[str, str], str] = {}
        # layer name -> LayerDefault: the kernel every bind in this registry uses when kernels= is silent
        self.layer_defaults: dict[str, LayerDefault] = {}
        self.architectures: dict[str, type] = {}
        self.plugins: list[str] = []
        self.failures: list[PluginFailure] = []
        self.add_plugin(builtins, "builtin")
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes")
        if autoload:
            self.load_entry_points()

    # -- plugins ----------------------------------------------------------------------

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load every installed plugin of `group`; failures are recorded and logged."""
        for ep in importlib.metadata.entry_points(group=group):
            dist = ep.dist.name if ep.dist else "?"
            name = f"{ep.name} ({dist})"
            try:
                plugin = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plugin must not break kernelhub
                self._fail(name, f"import of {ep.value!r} failed: {type(e).__name__}: {e}", e)
                continue
            self.add_plugin(plugin, name)

    def add_plugin(self, plugin: object, name: str) -> None:
        """Register a plugin object or module and collect what its hooks provide."""
        with self._lock:
            try:
                self.pm.register(plugin, name=name)
            except ValueError as e:
                self._fail(name, str(e), e)
                return
            self.plugins.append(name)
            caller = self.pm.subset_hook_caller
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            try:
                for group in caller("kernelhub_attention_backends", others)():
                    for backend in group or ():
                        try:
                            self._add_backend(backend, name, replace=False)
                        except RegistrationError as e:
                            self._fail(name, str(e), e)
                for group in caller("kernelhub_layer_kernels", others)():
                    for layer, impls in (group or {}).items():
                        self.layer_kernels.setdefault(layer, {}).update(impls)
                        self.layer_kernel_sources.update({(layer, kernel): name for kernel in impls})
                for group in caller("kernelhub_model_architectures", others)():
                    self.architectures.update(group or {})
            except Exception as e:  # noqa: BLE001 - reported as a plugin failure, with the reason
                self._fail(name, f"hook raised {type(e).__name__}: {e}", e)

    def _fail(self, plugin: str, error: str, exc: BaseException) -> None:
        self.failures.append(PluginFailure(plugin, error))
        logger.warning("kernelhub plugin %s failed: %s (`kernelhub plugins` lists every failure; "
                       "KERNELHUB_VERBOSITY=debug shows the traceback)", plugin, error)
        # The traceback is for whoever debugs the plugin, not for every user of kernelhub.
        logger.debug("traceback of kernelhub plugin %s", plugin, exc_info=(type(exc), exc, exc.__traceback__))

    # -- backends ---------------------------------------------------------------------

    def _add_backend(self, backend: AttentionBackend, source: str, replace: bool) -> None:
        problems = backend_problems(backend)
        if problems:
            raise RegistrationError(f"cannot register backend {getattr(backend, 'name', backend)!r}: "
                                    + "; ".join(problems))
        names = (backend.name, *backend.aliases)
        with self._lock:
            backends, aliases = dict(self._backends), dict(self._aliases)
            if replace and backend.name in backends:
                old = backends.pop(backend.name).backend
                for alias in old.aliases:
                    aliases.pop(alias, None)
            for n in names:
                owner = backends.get(n) or backends.get(aliases.get(n, ""))
                if owner is not None:
                    raise RegistrationError(
                        f"backend name {n!r} from {source} is already registered by {owner.source} "
                        f"(backend {owner.backend.name!r}); pass replace=True to override it, or choose another name")
            backends[backend.name] = Registered(backend, source)
            for alias in backend.aliases:
                aliases[alias] = backend.name
            # Copy-on-write: readers in other threads see the old or the new dict, never half of one.
            self._backends, self._aliases = backends, aliases

    def register_backend(self, backend: AttentionBackend, *, replace: bool = False, source: str = "runtime") -> None:
        """Add `backend`; an existing name needs `replace=True`."""
        self._add_backend(backend, source, replace)

    def unregister_backend(self, name: str) -> AttentionBackend:
        """Remove a backend by name or alias and return it."""
        with self._lock:
            entry = self._backends.get(self._aliases.get(name, name))
            if entry is None:
                raise UnknownBackendError(f"no backend named {name!r} to unregister.{suggestion(name, self.names())} "
                                          f"Registered: {', '.join(self.backend_names())}")
            backends = {k: v for k, v in self._backends.items() if v is not entry}
            aliases = {k: v for k, v in self._aliases.items() if v != entry.backend.name}
            self._backends, self._aliases = backends, aliases
            return entry.backend

    def get(self, name: str) -> Registered:
        """The backend registered under `name`, one of its aliases, or a transformers spelling."""
        entry = self._backends.get(self._aliases.get(name, name))
        if entry is None and TRANSFORMERS_SPELLINGS.get(name) in self._backends:
            entry = self._backends[TRANSFORMERS_SPELLINGS[name]]
        if entry is None:
            valid = closest_first(name, self.names())
            meaning = TRANSFORMERS_SPELLINGS.get(name)
            known = (f" {name!r} is transformers' name for {meaning!r}, which no registered backend provides "
                     f"here." if meaning else suggestion(name, self.names()))
            raise UnknownBackendError(f"unknown attention implementation {name!r}.{known} "
                                      f"Valid names (closest first): {', '.join(valid)}")
        return entry

    def backend_names(self) -> list[str]:
        return list(self._backends)

    def set_layer_default(self, layer: str, impl: type, *, source: str, verify: bool = True) -> None:
        """Make `impl` the kernel of every `layer` module a bind in this registry is not told about
        (`kernels=` silent on it). `verify=False` skips its conformance probe (a test's deliberate
        wrong kernel); `source` is what the plan shows."""
        self.layer_defaults[layer] = LayerDefault(impl, source, verify)

    def names(self) -> list[str]:
        """Backend names and aliases."""
        return [*self._backends, *self._aliases]

    def backends(self) -> list[Registered]:
        return list(self._backends.values())

    def copy(self) -> "Registry":
        """An independent registry with the same contents (for scoping)."""
        new = Registry.__new__(Registry)
        # A plugin manager of its own (same plugin objects), so a plugin added in a scope,
        # such as a selection policy, does not leak into the parent registry.
        new.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        new.pm.add_hookspecs(hookspecs)
        for name, plugin in self.pm.list_name_plugin():
            new.pm.register(plugin, name=name)
        new._lock = threading.RLock()
        new._backends, new._aliases = dict(self._backends), dict(self._aliases)
        new.layer_kernels = {k: dict(v) for k, v in self.layer_kernels.items()}
        new.layer_kernel_sources = dict(self.layer_kernel_sources)
        new.layer_defaults = dict(self.layer_defaults)
        new.architectures = dict(self.architectures)
        new.plugins, new.failures = list(self.plugins), list(self.failures)
        return new


@dataclasses.dataclass(frozen=True)
class LayerDefault:
    """A registry's default kernel for one declared layer (`Registry.set_layer_default`)."""

    impl: object
    source: str
    verify: bool = True


def backend_problems(backend: object) -> list[str]:
    """What is wrong with a backend definition, before it can be registered."""
    if not isinstance(backend, AttentionBackend):
        return [f"expected an AttentionBackend, got {type(backend).__name__}"]
    problems = []
    if not isinstance(backend.name, str) or not backend.name.strip():
        problems.append("name must be a non-empty string")
    elif "|" in backend.name or "/" in backend.name or ":" in backend.name:
        problems.append("name may not contain '|', '/' or ':' (they mean paged and hub references)")
    if backend.mask_format is None:
        problems.append(f"no mask_format given; declare one of {', '.join(MASK_FORMATS)} "
                        "(a backend must never silently receive mask=None)")
    elif backend.mask_format not in MASK_FORMATS:
        problems.append(f"mask_format {backend.mask_format!r} is not one of {', '.join(MASK_FORMATS)}")
    if not callable(backend.fn):
        problems.append("fn must be callable as fn(module, q, k, v, mask, *, scaling, dropout=0.0, **kw)")
    return problems


_default: Registry | None = None
_default_lock = threading.Lock()
_current: contextvars.ContextVar[Registry | None] = contextvars.ContextVar("kernelhub_registry", default=None)


def get_registry() -> Registry:
    """The registry of the current context: a scoped one, else the process-wide one."""
    scoped = _current.get()
    if scoped is not None:
        return scoped
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Registry()
    return _default


@contextlib.contextmanager
def scoped_registry(*, fresh: bool = False, autoload: bool | None = None) -> Iterator[Registry]:
    """Use an isolated registry inside the block: registrations there do not leak out.

    By default the scope starts as a copy of the current registry; `fresh=True` starts
    from the built-ins (plus entry points unless autoload is disabled).

    >>> import kernelhub
    >>> with kernelhub.scoped_registry():
    ...     kernelhub.unregister_backend("flex").name
    'flex'
    >>> "flex" in [b.name for b in kernelhub.backends()]
    True
    """
    reg = Registry(autoload=autoload) if fresh else get_registry().copy()
    token = _current.set(reg)
    try:
        yield reg
    finally:
        _current.reset(token)


# -- the public functions over the current registry (re-exported from `kernelhub`) ---------

def register_backend(backend: AttentionBackend, *, replace: bool = False) -> None:
    """Register an attention backend in the current registry (scoped or global).

    >>> import kernelhub
    >>> from kernelhub.declare.eager import eager_attention
    >>> with kernelhub.scoped_registry():
    ...     kernelhub.register_backend(kernelhub.AttentionBackend("mine", eager_attention, mask_format="bool"))
    ...     "mine" in [b.name for b in kernelhub.backends()]
    True
    """
    get_registry().register_backend(backend, replace=replace)


def unregister_backend(name: str) -> AttentionBackend:
    """Remove a backend (by name or alias) from the current registry and return it."""
    return get_registry().unregister_backend(name)


def backends() -> list[AttentionBackend]:
    """The registered backends, in registration order."""
    return [r.backend for r in get_registry().backends()]


def backend_sources() -> list[Registered]:
    """The registered backends with the plugin each came from."""
    return get_registry().backends()
