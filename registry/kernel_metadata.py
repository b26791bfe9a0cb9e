"""`kernelhub.json`: what a kernel repo declares to kernelhub, read before any import.

It sits next to `metadata.json` in each build variant. Today it declares attention
functions: their mask format and capabilities, so a Hub attention kernel is checked
against each attention site like any registered backend, and a bad declaration is
refused without running the repo's code.

    {"attention": {"chunked_attention": {"mask_format": "bool",
                                         "capabilities": {"devices": ["cpu", "cuda"], "gqa": true}}},
     "default_attention": "chunked_attention"}

>>> spec = attention_specs({"attention": {"f": {"mask_format": "bool"}}}, "demo")["f"]
>>> spec.mask_format, spec.capabilities.gqa
('bool', True)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from kernelhub.registry.capabilities import MASK_FORMATS, Capabilities
from kernelhub.registry.errors import KernelhubError

FILE = "kernelhub.json"
_CAPABILITY_FIELDS = {f.name for f in dataclasses.fields(Capabilities)}


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    mask_format: str
    capabilities: Capabilities
    accepts_is_causal: bool = False


def read_kernel_metadata(variant_path: Path) -> dict:
    """The variant's `kernelhub.json`, or {} when it has none (validate with `attention_specs`)."""
    path = Path(variant_path) / FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KernelhubError(f"{str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise KernelhubError(f"{str(path)!r} must hold a JSON object")
    return data


def _dtype(name, origin):
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise KernelhubError(f"{origin}: {name!r} is not a torch dtype (e.g. 'float16', 'bfloat16')")
    return dtype


def _capabilities(raw: dict, origin: str) -> Capabilities:
    unknown = sorted(set(raw) - _CAPABILITY_FIELDS)
    if unknown:
        raise KernelhubError(f"{origin}: unknown capabilities {', '.join(unknown)}; "
                             f"valid: {', '.join(sorted(_CAPABILITY_FIELDS))}")
    values = dict(raw)
    for key in ("devices", "backward"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    if "dtypes" in values:
        values["dtypes"] = tuple(_dtype(d, origin) for d in values["dtypes"])
    if "head_dim" in values:
        values["head_dim"] = tuple(values["head_dim"])
    return Capabilities(**values)


def attention_specs(metadata: dict, origin: str) -> dict[str, AttentionSpec]:
    """Symbol -> AttentionSpec for every attention function the kernel declares."""
    specs = {}
    for symbol, raw in (metadata.get("attention") or {}).items():
        where = f"{origin}: attention[{symbol!r}]"
        if not isinstance(raw, dict):
            raise KernelhubError(f"{where} must be an object with mask_format and capabilities")
        fmt = raw.get("mask_format")
        if fmt not in MASK_FORMATS:
            raise KernelhubError(f"{where}: mask_format {fmt!r} is not one of {', '.join(MASK_FORMATS)}")
        specs[symbol] = AttentionSpec(fmt, _capabilities(raw.get("capabilities") or {}, where),
                                      bool(raw.get("accepts_is_causal", False)))
    return specs
