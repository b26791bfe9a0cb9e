"""Debugging numerics: trace every module's inputs and outputs, and find where two runs part.

    trace(model, inputs, keep_tensors=False) -> dict   per-module tensor stats as nested JSON
    save(trace, path) / load(path)                     a trace as a JSON file
    compare(trace_a, trace_b, atol=, rtol=) -> dict    per-module max abs / rel difference and
                                                       the first module that diverges
    format_comparison(result) -> str                   that as a table

The same comparison runs from the command line (`kernelhub diff MODEL --a sdpa --b flex`)
and in tests (the `assert_matches_reference` fixture of kernelhub's pytest plugin).

>>> import torch
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
>>> a = trace(model, torch.ones(1, 4), keep_tensors=True)
>>> [child["module_path"] for child in a["children"]]
['0', '1']
>>> compare(a, trace(model, torch.ones(1, 4), keep_tensors=True))["ok"]
True
"""

from kernelhub.debug.compare_traces import compare, format_comparison
from kernelhub.debug.trace_modules import load, nodes, save, tensor_stats, trace

__all__ = ["compare", "format_comparison", "load", "nodes", "save", "tensor_stats", "trace"]
