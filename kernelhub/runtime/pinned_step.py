"""A compiled step's guards on the model, checked once per `generate` call rather than every token.

Before each call of a compiled function, dynamo checks its guards: that every module of the model
still has the type, attributes and kernel forward it had when the graph was built, and
every weight its shape. For SmolLM2-135M that is about 6,000 checks, 1–1.5 ms a step on a 2-core
CPU: a seventh of a packed GGUF decode step. Within one `generate(compile=True)` call none of it
can change through kernelhub: the call holds the model `pinned` (a rebind waits for it to end),
and the step's inputs keep their shapes. (An edit of a module attribute from inside the call, a
streamer's say, is not seen by its later steps; a swapped weight of another shape makes the twin
recompile.) So:

- the call's **first** compiled step runs under the full guards, which pick (or build) the graph
  for the model as it is now: a rebind or an edited attribute since the last call is seen there,
  as in any compiled call (hooks added after compiling are not: dynamo skips guards on them);
- its **later** steps, once the graph has a twin (below), run that same graph through a second
  compiled function, `pinned(entry)`, whose guards on the model argument were dropped
  (`guard_filter_fn`), but for its tensors' dtypes, shapes and strides. Its remaining guards, a few
  hundred, are on tensors (the weights, the inputs, the cache), the globals the step reads, and grad
  mode and other global state. It is compiled from a copy of the step's code object, so dynamo keeps
  its cache apart, one per graph the full guards can pick.

The twin is not free: its first use traces the model a second time (inductor's caches make the rest
short). For SmolLM2-135M on a 2-core CPU that is about 10 s added to a process's first compiled call,
against about 1 ms a step of guards saved: it pays after some thousands of steps. So a graph gets
its twin once it has run `PIN_AFTER_STEPS` steps under the full guards in pinned calls (4096, or the
`KERNELHUB_PIN_AFTER_STEPS` environment variable; 0 pins from a graph's first call): a script that
generates a few hundred tokens never pays for it, a server soon does and keeps it.

It needs two dynamo internals, the cache entries of a code object and their guard managers;
where they are missing, every step keeps the full guards (the same results, slower).

>>> def step(x):
...     return x + 1
>>> copy = code_copy(step)
>>> copy(1), copy.__code__ is step.__code__
(2, False)
"""

from __future__ import annotations

import itertools
import os
import threading
import types
import weakref

import torch

from kernelhub.declare.errors import KernelhubError

try:
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list as cache_entries
except ImportError:  # another torch: full guards at every step
    cache_entries = None

MODEL_ARGUMENT = "model"  # the name of the compiled step's model parameter, whose guards are dropped

PIN_AFTER_STEPS = 4096  # full-guard steps a graph runs in pinned calls before its twin is built
PIN_AFTER_VARIABLE = "KERNELHUB_PIN_AFTER_STEPS"  # overrides it

_lock = threading.Lock()
# full-guard cache entry -> {variant (the caller's build options): pinned function}
_pinned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_served: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # full-guard cache entry -> steps run
_copies = itertools.count()


def drop_model_guards(guards) -> list[bool]:
    """`guard_filter_fn` of a pinned step: keep every guard but those on the model argument's
    attributes (its modules, their types and constants, its kernels), except the checks of its
    tensors' dtypes, shapes and strides: a weight swapped mid-call (a streamer's `.to()`, say) then
    makes the twin recompile rather than run its kernels on tensors of the wrong size."""
    return [guard.guard_type == "TENSOR_MATCH" or not _on_model(guard) for guard in guards]


def _on_model(guard) -> bool:
    source = guard.orig_guard.originating_source if guard.orig_guard is not None else None
    while getattr(source, "base", None) is not None:
        source = source.base
    if source is not None and hasattr(source, "local_name"):
        return source.local_name == MODEL_ARGUMENT
    return guard.name == MODEL_ARGUMENT or guard.name.startswith((f"{MODEL_ARGUMENT}.", f"{MODEL_ARGUMENT}["))


def code_copy(fn):
    """`fn` with a code object of its own: dynamo caches compiled graphs per code object."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_pinned_{next(_copies)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def graph_of(full, arguments: dict):
    """The cache entry (graph and full guards) that `arguments`, the step's parameters by name, pass
    among `full`'s compiled graphs (`full`: the step function torch.compile wraps); None where
    dynamo's internals are missing or no graph passes (the caller keeps the full guards)."""
    if cache_entries is None:
        return None
    with _lock:
        try:
            return next((e for e in cache_entries(full.__code__) if e.guard_manager.check(arguments)), None)
        except (AttributeError, RuntimeError, TypeError):  # internals changed shape: keep the full guards
            return None


def pin_after_steps() -> int:
    """`PIN_AFTER_STEPS`, or the whole number the `KERNELHUB_PIN_AFTER_STEPS` environment variable holds.

    >>> pin_after_steps()  # with the variable unset
    4096
    """
    value = os.environ.get(PIN_AFTER_VARIABLE, "").strip()
    if not value:
        return PIN_AFTER_STEPS
    if not value.isdigit():
        raise KernelhubError(f"{PIN_AFTER_VARIABLE}={value!r} is not a number of steps: set it to a whole number "
                         f"(0 pins a compiled graph from its first call, the default is {PIN_AFTER_STEPS}) or unset it")
    return int(value)


def pinned(entry, compile_pinned, variant=None):
    """The pinned function for `entry`'s graph, counting one more step it ran under the full guards;
    None until it has run `PIN_AFTER_STEPS` of them. `compile_pinned()` makes one the first time,
    per `variant` (the caller's build options: entries of differently built wrappers share `full`'s
    code object)."""
    after = pin_after_steps()
    with _lock:
        twins = _pinned.setdefault(entry, {})
        if variant not in twins:
            _served[entry] = _served.get(entry, 0) + 1
            if _served[entry] < after:
                return None
            twins[variant] = compile_pinned()
        return twins[variant]


def one_call(step, names: tuple, compile_pinned, variant=None):
    """`run(full, args, may_pin)`: the compiled steps of one call (or one bucket of it) of `step`, whose
    parameters are `names`. The first runs `full` (`step` compiled with the full guards) and, where
    `may_pin` (the call pins the model on this thread; no CUDA graphs), finds the graph they picked;
    the later ones run that graph's twin once it has one (`pinned`), else `full` again. A twin that
    fails is forgotten and the call goes on under the full guards."""
    graph, twin = None, None  # graph: None until the first step, False where the call keeps full guards

    def run(full, args: tuple, may_pin: bool):
        nonlocal graph, twin
        if twin:
            try:
                return twin(*args)
            except torch._dynamo.exc.TorchDynamoException:  # the twin failed: full guards from now on
                forget(twin)
                graph, twin = False, None
        out = full(*args)
        if graph is None:  # the full guards just picked this call's graph
            graph = may_pin and graph_of(step, dict(zip(names, args))) or False
        if graph:
            twin = pinned(graph, compile_pinned, variant)
        return out

    return run


def forget(step) -> None:
    """Drop the pinned function `step` (one that failed): the next call that picks its graph builds
    another."""
    with _lock:
        for twins in list(_pinned.values()):
            for variant, twin in list(twins.items()):
                if twin is step:
                    del twins[variant]


def pinned_count() -> int:
    """How many pinned functions exist now (one per graph the full guards picked): for tests."""
    return sum(len(twins) for twins in _pinned.values())

