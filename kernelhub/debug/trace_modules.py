"""`trace`: run a model once and record every submodule's tensor inputs and outputs as nested JSON.

Like transformers' model debugger (`model_addition_debugger_context`), but with forward
hooks instead of wrapped forwards, so it sees bound kernels exactly as they run and leaves
nothing behind. Each call of each module becomes one node:

    {"module_path": "model.layers.0.input_layernorm", "type": "RMSNorm", "call": 0, "order": 3,
     "inputs":  [{"name": "0", "shape": [1, 5, 64], "dtype": "float32", "mean": ..., "std": ...,
                  "absmax": ..., "nan": 0, "inf": 0}],
     "outputs": [{"name": "", ...}],
     "children": [...]}

`module_path` is the `named_modules()` name ("" for the model itself), `call` counts calls
of the same module in this forward, `order` is the position at which the call *finished*
(so a child comes before its parent: the order in which outputs were produced). Entry
names are dotted paths into the value: positional inputs "0", "1", keyword inputs by name,
tuple outputs "0", "1", dataclass / dict outputs by field ("logits"); "" is a bare tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch

from kernelhub.declare.errors import KernelhubError

MAX_DEPTH = 8  # containers nest shallowly in practice; the limit stops walks into odd object graphs


def _number(value: float):
    """A JSON-strict float: NaN and infinities become the strings "nan", "inf", "-inf"."""
    return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))


def tensor_stats(t: torch.Tensor, keep: bool = False) -> dict:
    """Shape, dtype, mean, std (population), absmax and NaN / Inf counts of `t`, JSON-ready.

    Statistics are computed in float64 over every element, so a NaN anywhere makes the mean
    "nan"; the counts say how many. Empty and meta tensors have `None` statistics.

    >>> tensor_stats(torch.tensor([1.0, -3.0]))
    {'shape': [2], 'dtype': 'float32', 'mean': -1.0, 'std': 2.0, 'absmax': 3.0, 'nan': 0, 'inf': 0}
    """
    t = t.detach()
    out = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if t.numel() == 0 or t.device.type == "meta":
        return {**out, "mean": None, "std": None, "absmax": None, "nan": 0, "inf": 0}
    x = t.abs() if t.is_complex() else t
    x = (x.cpu() if x.device.type == "mps" else x).to(torch.float64)  # mps has no float64
    out.update(mean=_number(x.mean().item()), std=_number(x.std(correction=0).item()),
               absmax=_number(x.abs().max().item()), nan=int(torch.isnan(x).sum()), inf=int(torch.isinf(x).sum()))
    if keep:
        out["value"] = t.cpu().tolist()
    return out


def flatten(value: object, prefix: str = "", keep: bool = False, _seen: tuple = (), _depth: int = 0) -> list[dict]:
    """Stats of every tensor inside `value` (tuples, lists, dicts, dataclasses), named by path."""
    if isinstance(value, torch.Tensor):
        return [{"name": prefix, **tensor_stats(value, keep)}]
    if _depth >= MAX_DEPTH or id(value) in _seen or isinstance(value, torch.nn.Module):
        return []
    if isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(value)]
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value)]
    else:
        return []  # None, numbers, strings, masks' functions, caches: nothing to compare numerically
    seen = (*_seen, id(value))
    return [entry for key, item in items
            for entry in flatten(item, f"{prefix}.{key}" if prefix else key, keep, seen, _depth + 1)]


def trace(model: torch.nn.Module, inputs: torch.Tensor | dict | tuple, *, keep_tensors: bool = False) -> dict:
    """Run `model` once on `inputs` under `torch.no_grad()` and return the call tree (see module doc).

    `inputs` is a tensor (`model(inputs)`), a dict of keyword arguments (`model(**inputs)`)
    or a tuple of positional arguments (`model(*inputs)`). With `keep_tensors=True` every
    entry also holds `"value"`, the full tensor as nested lists (for `compare`; `save`
    leaves them out unless asked). Hooks are removed afterwards, also when the forward raises.

    >>> from kernelhub.models.llama import LlamaForCausalLM
    >>> model = LlamaForCausalLM({"vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
    ...                           "num_hidden_layers": 1, "num_attention_heads": 2})
    >>> t = trace(model, torch.tensor([[1, 2, 3]]))
    >>> t["type"], t["outputs"][0]["name"], t["outputs"][0]["shape"]
    ('LlamaForCausalLM', 'logits', [1, 3, 16])
    >>> [c["module_path"] for c in t["children"][0]["children"]][:2]
    ['model.embed_tokens', 'model.rotary_emb']
    """
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, tuple):
        args, kwargs = inputs, {}
    else:
        raise KernelhubError(f"trace: inputs must be a tensor of token ids, a dict of keyword arguments or a tuple "
                             f"of positional arguments, not {type(inputs).__name__}")
    stack, roots, calls, finished = [], [], {}, [0]

    def pre(module, a, kw, path):
        call = calls[path] = calls.get(path, -1) + 1
        stack.append({"module_path": path, "type": type(module).__name__, "call": call, "order": None,
                      "inputs": flatten(a, keep=keep_tensors) + flatten(kw, keep=keep_tensors),
                      "outputs": [], "children": []})

    def post(module, a, kw, output, path):
        node = stack.pop()
        node["outputs"], node["order"] = flatten(output, keep=keep_tensors), finished[0]
        finished[0] += 1
        (stack[-1]["children"] if stack else roots).append(node)

    handles = []
    try:
        for path, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(
                lambda m, a, kw, p=path: pre(m, a, kw, p), with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda m, a, kw, out, p=path: post(m, a, kw, out, p), with_kwargs=True))
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if len(roots) != 1:  # the model's own hooks ran once, around everything else
        raise KernelhubError(f"trace: expected one top-level call of {type(model).__name__}, recorded {len(roots)}")
    return roots[0]


def nodes(tree: dict) -> list[dict]:
    """Every node of a trace, in the order the calls finished (children before parents)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(node.get("children", []))
    return sorted(out, key=lambda n: n["order"])


def _without_values(node: dict) -> dict:
    def strip(entries):
        return [{k: v for k, v in e.items() if k != "value"} for e in entries]

    return {**node, "inputs": strip(node["inputs"]), "outputs": strip(node["outputs"]),
            "children": [_without_values(c) for c in node["children"]]}


def save(tree: dict, path: str | os.PathLike, *, tensors: bool = False) -> Path:
    """Write a trace as JSON (indented); full tensors only with `tensors=True`.

    Without tensors the file is strict JSON. With them, non-finite values are written as
    Python's `json` writes them (`NaN`, `Infinity`), which `load` reads back.

    >>> import tempfile, os
    >>> t = {"module_path": "", "type": "M", "call": 0, "order": 0, "inputs": [], "outputs": [], "children": []}
    >>> load(save(t, os.path.join(tempfile.mkdtemp(), "t.json"))) == t
    True
    """
    path = Path(path)
    path.write_text(json.dumps(tree if tensors else _without_values(tree), indent=1, allow_nan=tensors))
    return path


def load(path: str | os.PathLike) -> dict:
    """Read a trace written by `save`."""
    try:
        tree = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise KernelhubError(f"cannot read trace {path}: {e}") from None
    if not isinstance(tree, dict) or not {"module_path", "outputs", "children", "order"} <= tree.keys():
        raise KernelhubError(f"{path} is not a kernelhub trace: expected an object with module_path, order, "
                             "outputs and children (written by kernelhub.debug.save)")
    return tree
