"""Module paths that moved in 0.3, kept importable for one release with a DeprecationWarning.

Plugins written against 0.2 import, say, `kernelhub.models.generate`; that module now lives in
`kernelhub.runtime`. The finder below answers the old name with the new module itself (one
module object under two names, so state and monkeypatches are shared) and warns once per name.
Remove in 0.4.

>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     import kernelhub.models.sampling as old
>>> import kernelhub.runtime.sampling as new
>>> old is new, "kernelhub.runtime.sampling" in str(caught[0].message)
(True, True)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "kernelhub.cli_args": "kernelhub.cli.args",
    "kernelhub.cli_diff": "kernelhub.cli.diff",
    "kernelhub.cli_hub": "kernelhub.cli.hub",
    "kernelhub.debug_diff": "kernelhub.debug.compare_traces",
    "kernelhub.debug_trace": "kernelhub.debug.trace_modules",
    "kernelhub.demo": "kernelhub.cli.demo",
    "kernelhub.docs_gen": "kernelhub.cli.docs_gen",
    "kernelhub.kernel_build": "kernelhub.kernel.build",
    "kernelhub.kernel_check": "kernelhub.kernel.check",
    "kernelhub.kernel_publish": "kernelhub.kernel.publish",
    "kernelhub.models.batch_encoding": "kernelhub.checkpoint.batch_encoding",
    "kernelhub.models.batch_options": "kernelhub.runtime.batch_options",
    "kernelhub.models.batching": "kernelhub.runtime.batching",
    "kernelhub.models.chat_template": "kernelhub.checkpoint.chat_template",
    "kernelhub.models.checkpoint": "kernelhub.checkpoint.hf_layout",
    "kernelhub.models.compiled_batching": "kernelhub.runtime.compiled_batching",
    "kernelhub.models.compiled_decode": "kernelhub.runtime.compiled_decode",
    "kernelhub.models.config_schema": "kernelhub.declare.config_schema",
    "kernelhub.models.export": "kernelhub.runtime.export",
    "kernelhub.models.generate": "kernelhub.runtime.generate",
    "kernelhub.models.generation_config": "kernelhub.checkpoint.generation_config",
    "kernelhub.models.gguf": "kernelhub.checkpoint.gguf",
    "kernelhub.models.gguf_tokenizer": "kernelhub.checkpoint.gguf_tokenizer",
    "kernelhub.models.kept_cache": "kernelhub.runtime.kept_cache",
    "kernelhub.models.sampling": "kernelhub.runtime.sampling",
    "kernelhub.models.tensor_parallel": "kernelhub.runtime.tensor_parallel",
    "kernelhub.models.tensor_parallel_load": "kernelhub.runtime.tensor_parallel_load",
    "kernelhub.models.tensor_parallel_sync": "kernelhub.runtime.tensor_parallel_sync",
    "kernelhub.models.tokenizer": "kernelhub.checkpoint.tokenizer",
    "kernelhub.pytest_plugin": "kernelhub.testing.pytest_plugin",
    "kernelhub.registry.pretrained": "kernelhub.runtime.pretrained",
    "kernelhub.samples": "kernelhub.testing.samples",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        warnings.warn(f"{spec.name} moved to {MOVED[spec.name]}; the old path stops working in kernelhub 0.4",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # the new module is already executed


def install() -> None:
    """Put the finder first on `sys.meta_path` (once)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())
