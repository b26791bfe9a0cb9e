"""Every public function and method kernelhub exports is annotated: each parameter and the return.

The walk covers every name in `kernelhub.__all__`: functions; classes, with their public methods
(and `__init__`/`__call__`) defined in kernelhub, properties included; and exported modules,
through their own `__all__`. Nothing is skipped: only `self`/`cls` go without an annotation.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Iterator

import kernelhub

Found = tuple[str, Callable, bool]  # (qualified name, function, whether self/cls comes first)


def _defined_in_kernelhub(obj: object) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "kernelhub"


def _methods(cls: type) -> Iterator[tuple[str, Callable]]:
    """(qualified name, function) for each public method `cls` has from kernelhub classes."""
    seen = set()
    for klass in cls.__mro__:
        if not _defined_in_kernelhub(klass):
            continue
        for name, member in vars(klass).items():
            if name in seen or (name.startswith("_") and name not in ("__init__", "__call__")):
                continue
            seen.add(name)
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if isinstance(member, property):
                yield f"{cls.__name__}.{name}", member.fget
            elif inspect.isfunction(member):
                yield f"{cls.__name__}.{name}", member


def _callables() -> Iterator[Found]:
    """(qualified name, function, is_method) for the whole exported API, each function once
    (`LayerCapabilities` is another name of `Capabilities`)."""
    seen = set()
    for qualname, fn, is_method in _exported():
        if fn not in seen:
            seen.add(fn)
            yield qualname, fn, is_method


def _exported() -> Iterator[Found]:
    for name in kernelhub.__all__:
        obj = getattr(kernelhub, name)
        if isinstance(obj, types.ModuleType):
            assert hasattr(obj, "__all__"), f"kernelhub.{name} exports no __all__: say what is public there"
            for sub in obj.__all__:
                yield from _walk(f"{name}.{sub}", getattr(obj, sub))
        else:
            yield from _walk(name, obj)


def _walk(name: str, obj: object) -> Iterator[Found]:
    if inspect.isclass(obj):
        yield from ((f"{name.rpartition('.')[0]}.{q}".lstrip("."), f, True) for q, f in _methods(obj))
    elif callable(obj):
        yield name, inspect.unwrap(obj), False
    else:
        raise AssertionError(f"kernelhub public name {name} is neither a function, a class nor a module; "
                             "teach this test how to check it")


def _missing(qualname: str, fn: Callable, is_method: bool) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())
    if is_method and params and params[0].name in ("self", "cls"):
        params = params[1:]
    missing = [f"{qualname}({p.name})" for p in params if p.annotation is inspect.Parameter.empty]
    if inspect.signature(fn).return_annotation is inspect.Signature.empty:
        missing.append(f"{qualname} -> return")
    return missing


def test_the_walk_reaches_the_whole_public_api() -> None:
    names = {q for q, _, _ in _callables()}
    for expected in ("bind", "use_kernels", "scoped_registry", "unsupported", "layer", "causal_mask",
                     "from_pretrained", "explain", "load_tokenizer", "AttentionMask.to_ascii",
                     "AttentionSite.__init__", "BindingPlan.to_dict", "DynamicCache.update", "Capabilities.on",
                     "debug.trace"):
        assert expected in names, expected


def test_every_public_function_and_method_is_annotated() -> None:
    missing = [m for q, fn, is_method in _callables() for m in _missing(q, fn, is_method)]
    assert not missing, f"{len(missing)} without an annotation:\n" + "\n".join(missing)
