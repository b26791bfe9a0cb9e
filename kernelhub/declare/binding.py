"""One binding per forward: a model's whole binding is one immutable record, read once at entry.

Binding computes a `ModelBinding` (every attention site's `SiteBinding` and every declared
layer's kernel forward) and publishes it on the model in one statement. A forward of the model
makes that record the active one for its thread (a `ContextVar`, set by a forward pre-hook and
reset by an always-called forward hook), and every site and layer inside looks itself up in the
active record. A rebind in another thread publishes a new record; forwards already running keep
the one they started with, the next forward sees the new one whole. `generate` and
`generate_batch` hold one record for their whole call (`holding(model)`).

Inside a torch.compile graph the record is not looked up (dynamo cannot trace a `ContextVar`):
sites and layers read their own attributes, which the graph's guards pin for one graph call. A
compiled `generate` runs many graph calls, so it holds the model `pinned`: a rebind of that model
waits until the call ends (and a rebind from inside the call, a streamer's say, is refused).

>>> import torch
>>> from kernelhub.declare.site import AttentionSite
>>> site = AttentionSite(head_dim=4, num_heads=1)
>>> record = ModelBinding({id(site): site.binding}, {})
>>> with active(record):
...     site_record(site) is record.sites[id(site)]
True
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import types

import torch

from kernelhub.declare.errors import BindError

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("kernelhub_binding", default=None)
_PUBLISHED = "_kernelhub_model_binding"   # model.__dict__ key of the current ModelBinding
_HOOKED = "_kernelhub_binding_hooks"
_OWN = "_kernelhub_forward"               # a layer's own kernel forward, for calls outside a model forward
_MISSING = object()


@dataclasses.dataclass(frozen=True, eq=False)
class ModelBinding:
    """Every site's record and every declared layer's forward (None: the reference), by module id."""

    sites: dict
    layers: dict
    owner: int = 0  # id() of the model it was published on


def published(model) -> ModelBinding | None:
    """The record `model` runs now (None before its first bind)."""
    return model.__dict__.get(_PUBLISHED)


def publish(model, binding: ModelBinding) -> None:
    """Make `binding` the one the next forward of `model` runs (one statement: never half of it)."""
    _install_hooks(model)
    model.__dict__[_PUBLISHED] = dataclasses.replace(binding, owner=id(model))


@contextlib.contextmanager
def active(binding: ModelBinding | None):
    """Make `binding` the active record in this thread for the block."""
    token = _ACTIVE.set(binding)
    try:
        yield binding
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def holding(model):
    """Run the block (a whole `generate` call, say) on the record `model` has now, even if another
    thread rebinds meanwhile; inside an outer hold of the same model, keep the outer one."""
    current = _ACTIVE.get()
    if current is not None and current.owner == id(model):
        yield current
        return
    with active(published(model)) as binding:
        yield binding


def site_record(site):
    """The `SiteBinding` `site` runs in the current forward."""
    if not torch.compiler.is_compiling():
        binding = _ACTIVE.get()
        if binding is not None:
            record = binding.sites.get(id(site))
            if record is not None:
                return record
    return site._binding


def layer_forward(module):
    """The forward function (taking the module as self) `module` runs in the current forward."""
    if not torch.compiler.is_compiling():
        binding = _ACTIVE.get()
        if binding is not None:
            forward = binding.layers.get(id(module), _MISSING)
            if forward is not _MISSING:
                return forward or type(module).forward
    # attribute access, not __dict__.get: a compiled graph's guards then watch the value itself
    return getattr(module, _OWN, None) or type(module).forward


def _dispatch(self, *args, **kwargs):
    return layer_forward(self)(self, *args, **kwargs)


def set_own_forward(module, forward) -> None:
    """Record `module`'s kernel forward (None: the reference) and make the module look it up per call.

    The look-up (`_dispatch`) is installed the first time a module gets a kernel and stays: a
    module that never had one keeps calling its class's forward directly, at no cost."""
    if forward is None:
        module.__dict__.pop(_OWN, None)
    else:
        module.__dict__[_OWN] = forward
    running = module.__dict__.get("forward")
    if forward is not None and not is_dispatcher(running, module):
        module.forward = types.MethodType(_dispatch, module)
    elif forward is None and running is not None and not is_dispatcher(running, module):
        del module.__dict__["forward"]  # something outside kernelhub replaced it: back to the reference


def is_dispatcher(running, module) -> bool:
    return getattr(running, "__func__", None) is _dispatch and running.__self__ is module


def own_forward(module):
    """`module`'s kernel forward outside any model forward (None: the reference)."""
    return module.__dict__.get(_OWN)


_stacks = threading.local()


def _enter(model, args):
    if torch.compiler.is_compiling():  # a graph runs the binding its guards pin (module docstring)
        return
    stack = _stacks.__dict__.setdefault("tokens", [])
    current = _ACTIVE.get()
    if current is not None and current.owner == id(model):
        stack.append(None)  # already inside this model's forward or generate call: keep that record
    else:
        stack.append(_ACTIVE.set(published(model)))


def _exit(model, args, output):
    if torch.compiler.is_compiling():
        return
    token = _stacks.tokens.pop()
    if token is not None:
        _ACTIVE.reset(token)


def _install_hooks(model) -> None:
    if _HOOKED not in model.__dict__:
        model.__dict__[_HOOKED] = (model.register_forward_pre_hook(_enter),
                                   model.register_forward_hook(_exit, always_call=True))


_pins: dict = {}                 # id(model) -> compiled calls running on it
_pinned_here = threading.local()  # pins: [(id(model), token)] of the pins this thread holds, innermost last
_pin_change = threading.Condition()


@contextlib.contextmanager
def pinned(model):
    """Keep `model`'s binding as it is for the block (a compiled generate call): rebinds wait."""
    key, token = id(model), object()
    with _pin_change:
        _pins[key] = _pins.get(key, 0) + 1
    mine = _pinned_here.__dict__.setdefault("pins", [])
    mine.append((key, token))
    try:
        yield
    finally:
        mine.remove((key, token))
        with _pin_change:
            _pins[key] -= 1
            if not _pins[key]:
                del _pins[key]
            _pin_change.notify_all()


def pin_of(model):
    """This thread's innermost pin of `model`: an object of that pin alone (a later pin, after which a
    rebind may have landed, has another), or None where this thread does not pin `model`. Another
    thread's pin does not count: it may end, and a rebind land, while this thread's call goes on.

    >>> model = object()
    >>> with pinned(model):
    ...     first = pin_of(model)
    >>> with pinned(model):
    ...     second = pin_of(model)
    >>> first is not None and second is not None and first is not second, pin_of(model)
    (True, None)
    """
    return next((token for key, token in reversed(getattr(_pinned_here, "pins", ())) if key == id(model)), None)


def is_pinned(model) -> bool:
    """Whether a call on this thread holds `model` pinned now (see `pin_of`)."""
    return pin_of(model) is not None


@contextlib.contextmanager
def changing(model):
    """Held while a bind changes `model`: waits for its pinned calls to end, and no new one starts
    until the change is published."""
    if is_pinned(model):
        raise BindError(f"cannot rebind {type(model).__name__} from inside its own compiled generate call "
                        "(a streamer, say): the call runs one binding from start to end; rebind after it returns")
    with _pin_change:
        _pin_change.wait_for(lambda: id(model) not in _pins)
        yield
