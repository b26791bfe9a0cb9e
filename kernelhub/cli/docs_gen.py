"""Docs tables generated from backend and layer-kernel capabilities (capabilities are data).

    python -m kernelhub.cli.docs_gen docs/attention.md   # rewrites the generated block
"""

from __future__ import annotations

import sys
from pathlib import Path

BEGIN, END = "<!-- capability-matrix:begin -->", "<!-- capability-matrix:end -->"
LAYERS_BEGIN, LAYERS_END = "<!-- layer-kernels:begin -->", "<!-- layer-kernels:end -->"
FEATURES = ("gqa", "sliding_window", "softcap", "sinks", "dropout", "returns_weights", "varlen", "paged",
            "arbitrary_mask", "compile", "backward")


def _cell(value) -> str:
    """yes / no, or the device types for a per-device capability."""
    if isinstance(value, tuple):
        return " ".join(value) + " only"
    return "yes" if value else "no"


def _dtypes(value) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in value)


def _head_dim(value) -> str:
    return f"{value[0]}..{value[1]}"


def _with_devices(caps, field: str, fmt) -> str:
    """The value of `field`, followed by the devices where it differs: '1..512 (cuda: 16..256)'."""
    base = fmt(getattr(caps, field))
    others = [f"{device}: {fmt(overrides[field])}" for device, overrides in caps.per_device.items()
              if field in overrides and fmt(overrides[field]) != base]
    return f"{base} ({'; '.join(others)})" if others else base


def capability_rows(entries) -> list[dict]:
    """One dict per registered backend: name, aliases, mask format, source, features, dtypes, head_dim.

    A capability that differs per device shows each device's value."""
    rows = []
    for entry in entries:
        b, caps = entry.backend, entry.backend.capabilities
        rows.append({
            "name": b.name,
            "aliases": ", ".join(b.aliases) or "-",
            "mask": b.mask_format,
            "source": entry.source,
            "features": ",".join(caps.features()) or "-",
            "devices": ", ".join(caps.devices),
            "dtypes": _with_devices(caps, "dtypes", _dtypes),
            "head_dim": _with_devices(caps, "head_dim", _head_dim),
            **{f: _with_devices(caps, f, _cell) for f in FEATURES},
        })
    return rows


def capability_matrix_markdown(entries) -> str:
    """A markdown table: one row per backend, one column per capability."""
    rows = capability_rows(entries)
    cols = ["name", "aliases", "mask", "devices", "dtypes", "head_dim", *FEATURES]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def layer_kernel_rows(registry) -> list[dict]:
    """One dict per registered layer kernel: layer, name, source, devices, dtypes, features (capabilities as data)."""
    from kernelhub.registry.layer_contract import layer_capabilities

    rows = []
    for layer in sorted(registry.layer_kernels):
        for name, impl in registry.layer_kernels[layer].items():
            caps = layer_capabilities(impl, hub=False)
            rows.append({"layer": layer, "name": name, "source": registry.layer_kernel_sources.get((layer, name), "-"),
                         "devices": ", ".join(caps.devices or ("any",)),
                         "dtypes": _dtypes(caps.dtypes) if caps.dtypes else "any",
                         "features": ", ".join(caps.features()) or "-", "caps": caps})
    return rows


def layer_kernel_markdown(registry) -> str:
    """A markdown table: one row per registered layer kernel, grouped by layer name."""
    cols = ["layer", "name", "devices", "dtypes", "features"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in layer_kernel_rows(registry)]
    return "\n".join(lines)


def _replace(text: str, begin: str, end: str, body: str) -> str:
    if begin not in text:
        return text
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def render(text: str, entries, registry=None) -> str:
    """`text` with the blocks between the capability-matrix and layer-kernels markers regenerated
    (layer kernels from `registry`, default the current one)."""
    from kernelhub.registry.plugins import get_registry

    text = _replace(text, BEGIN, END, capability_matrix_markdown(entries))
    return _replace(text, LAYERS_BEGIN, LAYERS_END, layer_kernel_markdown(registry or get_registry()))


def main(path: str) -> None:
    from kernelhub.registry.plugins import scoped_registry

    with scoped_registry(fresh=True, autoload=False) as reg:
        file = Path(path)
        file.write_text(render(file.read_text(), reg.backends(), reg))


if __name__ == "__main__":
    main(sys.argv[1])
