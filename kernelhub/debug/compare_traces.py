"""`compare`: module-by-module differences between two traces, and the first module that diverges.

Nodes are matched by module path and call number, outputs by name. "First" is in the
order calls finished, so a wrong `model.layers.0.input_layernorm` is named before the
decoder layer and the model that contain it, which only inherit its error.

An output diverges when some element has |a - b| > atol + rtol * |a|, with trace_a as the
reference (NaN matches NaN). By default both scale with the tensor and its dtype:

    atol = tol(dtype) * max|a|        rtol = tol(dtype)        tol(dtype) = n(dtype) * eps(dtype)

with n = 256 ulps for float32 and float64 (long reductions that reorder their sums) and 16
for 16-bit floats (accumulated in float32, rounded once per op): float32 3.1e-5, float16
1.6e-2, bfloat16 0.125, float64 1.5e-14; integers and bools exact.

Kernels that reorder a sum differ by a few ulps *of the largest values they add*, so an
element-wise absolute tolerance would flag a residual stream that reaches 1e4 while a
0.1% error in one norm must still be named: the tolerance follows max|a|. An explicit
`atol` is absolute (as in `torch.allclose`) and an explicit `rtol` replaces tol(dtype).
`max_rel` is max|a - b| / max|a|, a tensor-wide relative error that stays finite where the
reference has zeros. Traces taken with `keep_tensors=True` are compared element by element;
saved traces without tensors are compared on their statistics (mean, std, absmax), with
absmax standing for max|a|.
"""

from __future__ import annotations

import math

import torch

from kernelhub.debug.trace_modules import nodes

STATS = ("mean", "std", "absmax")
ULPS = {"float64": 256, "float32": 256}  # every other floating dtype: 16


def default_tolerance(dtype: str) -> float:
    """tol(dtype) = n * eps: the default rtol, and atol's share of max|a|; 0 (exact) for integer and
    bool tensors.

    Measured on SmolLM2 and MiniLM, eager, sdpa and flex differ by up to 45 float32 ulps of
    max|a| and 9 bfloat16 ulps: 256 and 16 ulps pass them while a 0.1% error in one float32
    norm (8,400 ulps) is still named.

    >>> round(default_tolerance("float32"), 7), default_tolerance("bfloat16"), default_tolerance("int64")
    (3.05e-05, 0.125, 0.0)
    """
    try:
        info = torch.finfo(getattr(torch, dtype))
    except (AttributeError, TypeError):  # int64, bool, or a name this torch does not know
        return 0.0
    return ULPS.get(dtype, 16) * float(info.eps)


def tolerances(a: dict, atol: float | None, rtol: float | None, scale: float) -> tuple[float, float]:
    """(atol, rtol) for reference entry `a` whose finite values reach `scale` = max|a|: given values
    win, else tol(dtype) * max|a| and tol(dtype).

    >>> tolerances({"dtype": "float32"}, None, None, 1e4)[0] > 0.2, tolerances({"dtype": "float32"}, 1e-3, 0.0, 1e4)
    (True, (0.001, 0.0))
    """
    tol = default_tolerance(a["dtype"])
    return (tol * scale if atol is None else atol), (tol if rtol is None else rtol)


def _float(x) -> float:
    """A stat back to a float ("nan", "inf" and None are how traces store what JSON cannot)."""
    return math.nan if x is None else float(x)


def _json(x: float):
    return x if math.isfinite(x) else ("nan" if math.isnan(x) else "inf")


def _diff_values(a: dict, b: dict, atol, rtol) -> tuple[float, float, int, int, float, float]:
    """(max abs diff, max rel diff, elements beyond tolerance, elements, atol, rtol) of two kept tensors."""
    x = torch.tensor(a["value"], dtype=torch.float64).reshape(a["shape"])
    y = torch.tensor(b["value"], dtype=torch.float64).reshape(b["shape"])
    both_nan = x.isnan() & y.isnan()
    same = (x == y) | both_nan  # equal infinities have a NaN difference, but match
    diff = torch.where(same, torch.zeros_like(x), (x - y).abs().nan_to_num(math.inf))
    scale = x.abs().nan_to_num(0.0, posinf=0.0).max().item() if x.numel() else 0.0
    atol, rtol = tolerances(a, atol, rtol, scale)
    bad = int((diff > atol + rtol * x.abs().nan_to_num(0.0)).sum())
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, max_rel, bad, x.numel(), atol, rtol


def _diff_stats(a: dict, b: dict, atol, rtol) -> tuple[float, float, int, int, float, float]:
    """The same numbers from statistics only: each stat counts as one element, absmax stands for max|a|."""
    scale = _float(a.get("absmax"))
    atol, rtol = tolerances(a, atol, rtol, scale if math.isfinite(scale) else 0.0)
    max_abs, max_rel, bad = 0.0, 0.0, 0
    for key in STATS:
        x, y = _float(a.get(key)), _float(b.get(key))
        if x == y or (math.isnan(x) and math.isnan(y)):
            continue
        d = abs(x - y) if not (math.isnan(x) or math.isnan(y)) else math.inf
        max_abs, bad = max(max_abs, d), bad + (not d <= atol + rtol * abs(x))
        max_rel = max(max_rel, d / abs(x) if x else math.inf)
    bad += (a.get("nan"), a.get("inf")) != (b.get("nan"), b.get("inf"))
    return max_abs, max_rel, bad, len(STATS), atol, rtol


def _compare_output(a: dict, b: dict, atol, rtol) -> dict:
    row = {"output": a["name"], "max_abs": 0.0, "max_rel": 0.0, "diverged": False, "note": ""}
    if a["shape"] != b["shape"]:
        return {**row, "max_abs": math.inf, "max_rel": math.inf, "diverged": True,
                "note": f"shape {a['shape']} vs {b['shape']}"}
    basis = "value" in a and "value" in b
    max_abs, max_rel, bad, total, atol, rtol = (_diff_values if basis else _diff_stats)(a, b, atol, rtol)
    note = (f"{bad}/{total} elements beyond atol={atol:.3g} + rtol={rtol:.3g}*|a|" if basis else
            f"statistics only; {bad} of mean/std/absmax/nan/inf beyond atol={atol:.3g} + rtol={rtol:.3g}*|a|") \
        if bad else ""
    return {**row, "max_abs": max_abs, "max_rel": max_rel, "diverged": bad > 0, "note": note}


def compare(trace_a: dict, trace_b: dict, *, atol: float | None = None, rtol: float | None = None) -> dict:
    """Per-module output differences between two traces of the same model and input.

    `atol` / `rtol` default per tensor: tol(dtype) * max|a| and tol(dtype), tol = n ulps of
    trace_a's dtype (float32 3.1e-5, bfloat16 0.125, float16 1.6e-2; integers exact; see the
    module doc). A given `atol` is absolute. Returns a JSON-ready dict:

        {"ok": bool, "first_divergent": row or None, "only_in_a": [...], "only_in_b": [...],
         "modules": [{"module_path", "call", "type", "output", "max_abs", "max_rel",
                      "diverged", "note"}, ...]}        # in the order calls finished

    where a row's numbers are those of its worst output; non-finite numbers are "nan" / "inf".
    An output only one trace has (eager's attention weights, say) is noted, not counted.

    >>> from kernelhub.debug.trace_modules import trace
    >>> lin = torch.nn.Linear(2, 2)
    >>> a = trace(lin, torch.ones(1, 2), keep_tensors=True)
    >>> with torch.no_grad():
    ...     _ = lin.bias.add_(0.5)
    >>> result = compare(a, trace(lin, torch.ones(1, 2), keep_tensors=True))
    >>> result["ok"], result["first_divergent"]["module_path"], round(result["first_divergent"]["max_abs"], 4)
    (False, '', 0.5)
    """
    index_b = {(n["module_path"], n["call"]): n for n in nodes(trace_b)}
    seen, rows = set(), []
    for node in nodes(trace_a):
        key = (node["module_path"], node["call"])
        other = index_b.get(key)
        if other is None:
            continue
        seen.add(key)
        outputs_a, outputs_b = {e["name"]: e for e in node["outputs"]}, {e["name"]: e for e in other["outputs"]}
        per_output = [_compare_output(e, outputs_b[name], atol, rtol) for name, e in outputs_a.items()
                      if name in outputs_b]
        worst = max(per_output, key=lambda r: (r["diverged"], r["max_abs"]), default=None) or \
            {"output": "", "max_abs": 0.0, "max_rel": 0.0, "diverged": False, "note": ""}
        # An output only one side has (eager's attention weights, which sdpa does not return) is
        # shown, not counted: what both produce is what must agree.
        one_sided = [f"output {name or '(tensor)'} only in {side}" for side, mine, theirs in
                     (("a", outputs_a, outputs_b), ("b", outputs_b, outputs_a)) for name in mine if name not in theirs]
        note = "; ".join(n for n in (worst["note"], *one_sided) if n)
        rows.append({"module_path": node["module_path"], "call": node["call"], "type": node["type"],
                     **{k: _json(v) if isinstance(v, float) else v for k, v in worst.items()}, "note": note})
    paths_a = [(n["module_path"], n["call"]) for n in nodes(trace_a)]
    first = next((r for r in rows if r["diverged"]), None)
    return {"ok": first is None, "first_divergent": first, "modules": rows,
            "only_in_a": [f"{p}#{c}" for p, c in paths_a if (p, c) not in seen],
            "only_in_b": [f"{p}#{c}" for p, c in index_b if (p, c) not in seen]}


def _label(row: dict) -> str:
    path = row["module_path"] or "(model)"
    path += f"#{row['call']}" if row["call"] else ""
    return path + (f" [{row['output']}]" if row["output"] else "")


def format_comparison(result: dict, *, names: tuple[str, str] = ("a", "b")) -> str:
    """`compare`'s result as a table in forward (finish) order, then a verdict line.

    >>> print(format_comparison({"ok": True, "first_divergent": None, "only_in_a": [], "only_in_b": [],
    ...     "modules": [{"module_path": "", "call": 0, "type": "M", "output": "", "max_abs": 0.0,
    ...                  "max_rel": 0.0, "diverged": False, "note": ""}]}))
    module   type  max abs  max rel
    (model)  M     0        0
    <BLANKLINE>
    a and b match: no module diverges (1 modules compared)
    """
    header = ("module", "type", "max abs", "max rel")
    lines = [(("! " if r["diverged"] else "") + _label(r), r["type"], f"{_float(r['max_abs']):.3g}",
              f"{_float(r['max_rel']):.3g}", r["note"]) for r in result["modules"]]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(4)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths)).rstrip() + (f"  {row[4]}" if row[4] else "")
            for row in lines]
    for side, missing in zip(names, (result["only_in_a"], result["only_in_b"])):
        if missing:
            out.append(f"only run under {side}: {', '.join(missing)}")
    first = result["first_divergent"]
    if first is None:
        out.append(f"\n{names[0]} and {names[1]} match: no module diverges ({len(result['modules'])} modules compared)")
    else:
        out.append(f"\nfirst divergent module: {_label(first)} ({first['type']}): "
                   f"max abs {_float(first['max_abs']):.3g}, max rel {_float(first['max_rel']):.3g}; {first['note']}")
    return "\n".join(out)
