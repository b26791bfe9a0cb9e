"""Binding modes as flags: what the bound model will be used for.

    Mode.INFERENCE                       forwards only (the default)
    Mode.TRAINING                        gradients flow through every bound kernel
    Mode.INFERENCE | Mode.TORCH_COMPILE  forwards under torch.compile
    Mode.TRAINING | Mode.TORCH_COMPILE   training under torch.compile

`kernels.Mode` values and the strings "inference", "training", "compile" (also combined as
"training|compile") are accepted wherever a mode is.

>>> parse_mode("training|compile") == Mode.TRAINING | Mode.TORCH_COMPILE
True
>>> str(Mode.INFERENCE | Mode.TORCH_COMPILE)
'inference|compile'
"""

from __future__ import annotations

import enum

from kernelhub.declare.errors import KernelhubError

_WORDS = {"inference": "INFERENCE", "training": "TRAINING", "compile": "TORCH_COMPILE",
          "torch_compile": "TORCH_COMPILE"}


class Mode(enum.Flag):
    """What a binding is for; combine with `|`. INFERENCE and TRAINING exclude each other."""

    INFERENCE = enum.auto()
    TRAINING = enum.auto()
    TORCH_COMPILE = enum.auto()

    @property
    def training(self) -> bool:
        return Mode.TRAINING in self

    @property
    def compile(self) -> bool:
        return Mode.TORCH_COMPILE in self

    def __str__(self) -> str:
        return "|".join(w for w, m in (("training", Mode.TRAINING), ("inference", Mode.INFERENCE),
                                       ("compile", Mode.TORCH_COMPILE)) if m in self)


ModeLike = Mode | str | object
"""What a `mode=` argument accepts: a `Mode`, a string such as 'training|compile', or a `kernels.Mode`."""

VALID = ("inference, training, compile (combined with '|', e.g. 'training|compile'), a kernelhub.Mode "
         "(Mode.TRAINING | Mode.TORCH_COMPILE) or a kernels.Mode")


def parse_mode(value: ModeLike) -> Mode:
    """A `Mode` from a Mode, a `kernels.Mode` or a string; a clear error for anything else."""
    if isinstance(value, Mode):
        mode = value
    elif type(value).__name__ == "Mode" and type(value).__module__.startswith("kernels"):
        names = [m.name for m in type(value) if m in value and m.name in ("INFERENCE", "TRAINING", "TORCH_COMPILE")]
        if not names:
            raise KernelhubError(f"mode {value!r} has no meaning for a binding; valid: {VALID}")
        mode = Mode(0)
        for name in names:
            mode |= Mode[name]
    elif isinstance(value, str) and value.strip():
        words = [w.strip().lower() for w in value.split("|")]
        unknown = [w for w in words if w not in _WORDS]
        if unknown:
            raise KernelhubError(f"unknown mode {value!r}; valid: {VALID}")
        mode = Mode(0)
        for word in words:
            mode |= Mode[_WORDS[word]]
    else:
        raise KernelhubError(f"mode must be a kernelhub.Mode or a string, got {value!r}; valid: {VALID}")
    if Mode.INFERENCE in mode and Mode.TRAINING in mode:
        raise KernelhubError(f"mode {value!r} asks for both inference and training; choose one (valid: {VALID})")
    if not mode & (Mode.INFERENCE | Mode.TRAINING):
        mode |= Mode.INFERENCE  # "compile" alone means compiled inference
    return mode
