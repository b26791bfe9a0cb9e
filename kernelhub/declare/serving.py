"""How a model's transformers-named serving methods reach the code that runs them.

Model files sit below the runtime: `kernelhub.runtime` imports the models, never the reverse.
Yet a model offers `model.generate(...)` and `model.generate_batch(...)` as transformers' models
do. The runtime provides those two functions here when it is imported (importing any part of
`kernelhub` imports it), and the model's methods call what was provided.

>>> provided("generate").__module__
'kernelhub.runtime.generate'
"""

from __future__ import annotations

from kernelhub.declare.errors import KernelhubError

_PROVIDED: dict = {}


def provide(**functions) -> None:
    """Called by `kernelhub.runtime`: `provide(generate=generate, generate_batch=generate_batch)`."""
    _PROVIDED.update(functions)


def provided(name: str):
    """The function the runtime provided under `name`."""
    try:
        return _PROVIDED[name]
    except KeyError:
        raise KernelhubError(f"{name} is served by kernelhub.runtime, which has not been imported; "
                             "import kernelhub first") from None
