"""The examples in public docstrings run and stay true."""

import doctest
import importlib
import os
import pkgutil

import pytest

import kernelhub

MODULES = sorted(
    f"{pkg}.{info.name}"
    for pkg in ("kernelhub", "kernelhub.declare", "kernelhub.registry", "kernelhub.registry.hub", "kernelhub.backends",
                "kernelhub.models")
    for info in pkgutil.iter_modules(importlib.import_module(pkg).__path__)
    if info.name not in ("__main__",)
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    for key, value in os.environ.items():  # an example may set a variable (KERNELHUB_TRUSTED): undone after
        monkeypatch.setenv(key, value)
    for key in ("KERNELHUB_TRUSTED", "KERNELHUB_CACHE"):  # the ones examples set; absent again after
        if key not in os.environ:
            monkeypatch.setenv(key, "")  # records "absent" for the undo
            monkeypatch.delenv(key)
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"kernelhub": kernelhub}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
