"""The examples in public docstrings run and stay true."""

import doctest
import importlib
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
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"kernelhub": kernelhub}, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
