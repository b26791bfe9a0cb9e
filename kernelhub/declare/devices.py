"""Which devices this process can put a model on, for errors that name what is available."""

from __future__ import annotations

import torch


def available_devices() -> list[str]:
    """The devices this process can put a model on: "cpu", then each GPU torch sees.

    >>> available_devices()[0]
    'cpu'
    """
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        names += [f"xpu:{i}" for i in range(xpu.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names
