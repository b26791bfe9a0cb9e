"""What a kernel variant declares, read from the verified bytes before any import.

`metadata.json` (written by the kernel's build, read by Hugging Face `kernels`): kernelhub
uses its `name` (the package to import) and `kernel-depends` (other Hub kernels it needs),
and lets `kernels` check the rest (`python-depends`, `kernels-minver`).

`kernelhub.json` (optional, next to it) declares attention functions: their mask format
and capabilities, so a Hub attention kernel is checked against each site like any
registered backend:

    {"attention": {"chunked_attention": {"mask_format": "bool",
                                         "capabilities": {"devices": ["cpu", "cuda"], "gqa": true}}},
     "default_attention": "chunked_attention"}

Every field is checked for its type and values; a wrong one is a `KernelMetadataError`
naming the file, the field, what was found and what is allowed.

>>> spec = attention_specs({"attention": {"f": {"mask_format": "bool"}}}, "demo")["f"]
>>> spec.mask_format, spec.capabilities.gqa
('bool', True)
"""

from __future__ import annotations

import dataclasses
import os
import re

import torch

from kernelhub.declare.errors import KernelhubError, KernelMetadataError
from kernelhub.declare.json_limits import check_file, load_json
from kernelhub.registry.capabilities import MASK_FORMATS, Capabilities
from kernelhub.registry.hub.ref import HubRef, parse_hub_ref

FILE = "kernelhub.json"
METADATA = "metadata.json"
MAX_JSON_BYTES = 1 << 20  # each of metadata.json and kernelhub.json: a few hundred bytes in practice
DEVICES = ("cpu", "cuda", "xpu", "mps", "npu", "hpu")
DTYPES = ("float32", "bfloat16", "float16")
_KERNEL_NAME = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")
_BOOL_FIELDS = {f.name for f in dataclasses.fields(Capabilities) if f.type == "bool"}



def _bad(file: str, field: str, found, allowed: str) -> KernelMetadataError:
    return KernelMetadataError(f"{file}: {field} is {found!r} ({type(found).__name__}); expected {allowed}")


def _json_object(data: bytes, file: str) -> dict:
    value = load_json(data, file, KernelMetadataError, max_bytes=MAX_JSON_BYTES)
    if not isinstance(value, dict):
        raise _bad(file, "the top level", value, "a JSON object")
    return value


def check_json_files(paths) -> None:
    """Refuse, by `stat` alone, any of `paths` (metadata.json, kernelhub.json files that exist)
    that is not a regular file within `MAX_JSON_BYTES`: `kernels` reads metadata.json whole
    before kernelhub sees the variant, and a FIFO would block that read forever."""
    for path in paths:
        if os.path.lexists(path):
            check_file(path, str(path), KernelMetadataError, max_bytes=MAX_JSON_BYTES)


@dataclasses.dataclass(frozen=True)
class VariantMetadata:
    """The fields of metadata.json kernelhub relies on."""

    name: str
    python_name: str
    depends: tuple[HubRef, ...]
    raw: bytes


def read_variant_metadata(files: dict, where: str) -> VariantMetadata:
    """Parse the variant's metadata.json from its verified bytes (`files`: relpath -> bytes)."""
    file = f"{where}/{METADATA}"
    if METADATA not in files:
        raise KernelMetadataError(f"{file} is missing; every kernel build variant has one")
    data = _json_object(files[METADATA], file)
    name = data.get("name")
    if not isinstance(name, str) or not _KERNEL_NAME.match(name):
        raise _bad(file, "name", name, "a kernel name: lowercase letters, digits and '-'")
    depends = data.get("kernel-depends", [])
    if not isinstance(depends, list):
        raise _bad(file, "kernel-depends", depends, "a list of {\"repo-id\": ..., \"version\": N} objects")
    refs = tuple(_dependency(dep, f"kernel-depends[{i}]", file) for i, dep in enumerate(depends))
    python_depends = data.get("python-depends", [])
    if not isinstance(python_depends, list) or not all(isinstance(d, str) for d in python_depends):
        raise _bad(file, "python-depends", python_depends, "a list of strings")
    return VariantMetadata(name, name.replace("-", "_"), refs, files[METADATA])


def _dependency(dep, field: str, file: str) -> HubRef:
    if not isinstance(dep, dict) or "repo-id" not in dep or len(set(dep) & {"version", "revision"}) != 1 \
            or set(dep) - {"repo-id", "version", "revision"}:
        raise _bad(file, field, dep, "an object with 'repo-id' and exactly one of 'version' or 'revision'")
    version = dep.get("version")
    if "version" in dep and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise _bad(file, f"{field}.version", version, "a positive integer")
    revision = dep.get("revision")
    if "revision" in dep and (not isinstance(revision, str) or "@" in revision or ":" in revision):
        raise _bad(file, f"{field}.revision", revision, "a branch, tag or commit")
    text = f"{dep['repo-id']}@{f'v{version}' if version is not None else revision}"
    try:
        ref = parse_hub_ref(text, f"{file}: {field}") if isinstance(dep["repo-id"], str) else None
    except KernelhubError as e:
        raise KernelMetadataError(str(e)) from None
    if not isinstance(ref, HubRef):
        raise _bad(file, f"{field}.repo-id", dep["repo-id"], "a Hub repo id 'org/name'")
    return ref


def check_with_kernels(meta: VariantMetadata, variant: str, origin) -> None:
    """`kernels`' own checks of a variant (required Python packages, kernels-minver)."""
    from kernels._rust import Metadata
    from kernels.validate import AllValidator, default_metadata_validators
    try:
        AllValidator(validators=default_metadata_validators()).validate_metadata(
            metadata=Metadata.from_bytes(meta.raw), variant=variant)
    except Exception as e:  # noqa: BLE001 - kernels raises ValueError/ImportError/RuntimeError here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise KernelMetadataError(f"{origin}: {first}") from None


# -- kernelhub.json ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    mask_format: str
    capabilities: Capabilities
    accepts_is_causal: bool = False


def read_kernel_metadata(files: dict, where: str) -> dict:
    """The variant's `kernelhub.json` as a checked dict, or {} when it has none."""
    if FILE not in files:
        return {}
    file = f"{where}/{FILE}"
    data = _json_object(files[FILE], file)
    unknown = sorted(set(data) - {"attention", "default_attention"})
    if unknown:
        raise _bad(file, "the top level", unknown, "only the fields attention, default_attention")
    if "attention" in data and not isinstance(data["attention"], dict):
        raise _bad(file, "attention", data["attention"], "an object of function name -> declaration")
    default = data.get("default_attention")
    if default is not None and (not isinstance(default, str) or default not in data.get("attention", {})):
        raise _bad(file, "default_attention", default, f"one of the declared functions "
                                                       f"({', '.join(data.get('attention', {})) or 'none'})")
    attention_specs(data, file)  # every declaration is checked now, before anything is imported
    return data


def _str_tuple(value, file, field, choices) -> tuple:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v in choices for v in value):
        raise _bad(file, field, value, f"a non-empty list drawn from {', '.join(choices)}")
    return tuple(value)


def _capabilities(raw, file: str, field: str) -> Capabilities:
    if not isinstance(raw, dict):
        raise _bad(file, field, raw, "an object of capability -> value")
    # a Hub file declares data only: per-device records and refusal functions are for in-process kernels
    known = {f.name for f in dataclasses.fields(Capabilities)} - {"per_device", "supports", "unsupported"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _bad(file, field, unknown, f"capabilities among {', '.join(sorted(known))}")
    values = {}
    for key, value in raw.items():
        where = f"{field}.{key}"
        if key in _BOOL_FIELDS:
            if not isinstance(value, bool):
                raise _bad(file, where, value, "true or false")
            values[key] = value
        elif key == "devices":
            values[key] = _str_tuple(value, file, where, DEVICES)
        elif key == "dtypes":
            values[key] = tuple(getattr(torch, d) for d in _str_tuple(value, file, where, DTYPES))
        elif key == "head_dim":
            if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int and v > 0 for v in value)
                    and value[0] <= value[1]):
                raise _bad(file, where, value, "[min, max], two positive integers with min <= max")
            values[key] = tuple(value)
        elif key == "backward":
            values[key] = value if isinstance(value, bool) else _str_tuple(value, file, where, DEVICES)
    return Capabilities(**values)


def attention_specs(metadata: dict, origin: str) -> dict[str, AttentionSpec]:
    """Symbol -> AttentionSpec for every attention function the kernel declares."""
    specs = {}
    for symbol, raw in (metadata.get("attention") or {}).items():
        field = f"attention[{symbol!r}]"
        if not symbol.isidentifier():
            raise _bad(origin, f"{field} key", symbol, "a Python function name")
        if not isinstance(raw, dict):
            raise _bad(origin, field, raw, "an object with mask_format and capabilities")
        unknown = sorted(set(raw) - {"mask_format", "capabilities", "accepts_is_causal"})
        if unknown:
            raise _bad(origin, field, unknown, "only the fields mask_format, capabilities, accepts_is_causal")
        fmt = raw.get("mask_format")
        if fmt not in MASK_FORMATS:
            raise _bad(origin, f"{field}.mask_format", fmt, f"one of {', '.join(MASK_FORMATS)}")
        causal = raw.get("accepts_is_causal", False)
        if not isinstance(causal, bool):
            raise _bad(origin, f"{field}.accepts_is_causal", causal, "true or false")
        specs[symbol] = AttentionSpec(fmt, _capabilities(raw.get("capabilities", {}), origin,
                                                         f"{field}.capabilities"), causal)
    return specs
