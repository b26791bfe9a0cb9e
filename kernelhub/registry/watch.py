"""Moving a bound model re-checks its binding: `model.to(torch.bfloat16)` keeps the plan true.

`nn.Module.to`, `.half()`, `.bfloat16()`, `.cuda()` and friends all go through `_apply`.
Binding wraps the model's `_apply` (on the instance, nothing else changes): before any
tensor moves, the target device and dtype are read from the conversion itself, the
binding is decided again for them, and a request that cannot serve there fails with the
model untouched. After the move, the new decisions are applied and `model.binding` says
what now runs.

>>> import torch
>>> from kernelhub.models.llama import LlamaForCausalLM
>>> model = LlamaForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 16,
...                           "num_hidden_layers": 1, "num_attention_heads": 2})
>>> _ = kernelhub.bind(model, "sdpa")
>>> model.to(torch.bfloat16).binding.dtype
'bfloat16'
"""

from __future__ import annotations

import torch

from kernelhub.declare.devices import available_devices
from kernelhub.declare.errors import BindError

_WATCHED = "_kernelhub_apply"


def _target(fn, param: torch.Tensor):
    """(device, dtype) the conversion `fn` would give a parameter like `param`; a device this torch cannot
    use (cuda on a CPU-only build: torch's bare AssertionError) is one `BindError`, before anything moves."""
    try:
        probe = fn(torch.empty(0, dtype=param.dtype, device=param.device))
    except (AssertionError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BindError(f"cannot move the model there: {first}; available: {', '.join(available_devices())}. "
                        "The model was not moved") from None
    return probe.device, probe.dtype


def watch_moves(model: torch.nn.Module, rebind, apply) -> None:
    """Make `model`'s moves re-check its binding: `rebind(model, device=, dtype=)` decides,
    `apply(model, decisions)` installs after the move."""
    if _WATCHED in model.__dict__:
        return

    def checked_apply(fn, recurse=True):
        plan = getattr(model, "binding", None)
        param = next(model.parameters(), None)
        if plan is None or param is None or param.device.type == "meta":
            return type(model)._apply(model, fn, recurse)
        device, dtype = _target(fn, param)
        if str(device).split(":")[0] == plan.device.split(":")[0] and str(dtype).removeprefix("torch.") == plan.dtype:
            return type(model)._apply(model, fn, recurse)
        decisions = rebind(model, device=device, dtype=dtype)  # raises before anything moves
        result = type(model)._apply(model, fn, recurse)
        apply(model, decisions)
        return result

    model.__dict__[_WATCHED] = True
    model.__dict__["_apply"] = checked_apply
