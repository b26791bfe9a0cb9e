"""The binding request a checkpoint recorded, and why a load applies it only when asked.

`save_pretrained` writes what was asked (`attn_implementation`, `kernels`) into config.json under
"kernelhub". A checkpoint is data, so a load never lets it choose code: recorded kernels, and a
recorded attention that names a Hub repo or a directory, are held back and shown in the plan,
unless the caller passes `kernels="from_config"`.

>>> requested({"kernelhub": {"kernels": {"RMSNorm": "./kern"}, "attn_implementation": "sdpa"}}, None, None, "c")
('sdpa', None, {'kernels': {'RMSNorm': './kern'}})
"""

from __future__ import annotations

from pathlib import Path

from kernelhub.declare.config_schema import found
from kernelhub.declare.errors import ConfigError, KernelhubError
from kernelhub.registry.hub.ref import looks_like_kernel_ref

FROM_CONFIG = "from_config"


def _names_code(value) -> bool:
    """Whether a request value names kernel code (a Hub repo or a directory), not a registered name."""
    if isinstance(value, dict):
        return any(_names_code(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_code(v) for v in value)
    return isinstance(value, str) and looks_like_kernel_ref(value.split("|")[-1])


def _anchored(value, base: Path):
    """`value` with each local kernel directory ("./kern[:Symbol]") made absolute under `base`."""
    if isinstance(value, dict):
        return {k: _anchored(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_anchored(v, base) for v in value]
    if isinstance(value, str) and value.startswith(("./", "../")):
        return str(base / value)
    return value


def requested(config, attn_implementation, kernels, source):
    """(attn_implementation, kernels, recorded request held back) for a load.

    A checkpoint never chooses code: what `save_pretrained` recorded under "kernelhub" is applied
    only when the caller says `kernels="from_config"`. Without it, recorded kernels are left out, and
    so is a recorded attn_implementation that names a Hub repo or a directory (registered names such
    as "sdpa" run no code from anywhere and still apply); the plan shows what was held back."""
    recorded = config.get("kernelhub") or {}
    if not isinstance(recorded, dict):
        raise ConfigError(f"{source}: 'kernelhub' is {found(recorded)}; allowed: an object (the binding request "
                          "save_pretrained records)")
    rec_attn, rec_kernels = recorded.get("attn_implementation"), recorded.get("kernels")
    if kernels == FROM_CONFIG:  # the user opted in; recorded directories are the checkpoint's, never the CWD's
        base = Path(source).parent
        return (attn_implementation if attn_implementation is not None else _anchored(rec_attn, base),
                _anchored(rec_kernels, base), {})
    if isinstance(kernels, str):
        raise KernelhubError(f"kernels={kernels!r}: pass a dict such as {{'RMSNorm': 'org/rmsnorm@v1'}}, or "
                             f"{FROM_CONFIG!r} to apply the request {source} recorded")
    held = {"kernels": rec_kernels} if rec_kernels and kernels is None else {}
    attn = attn_implementation
    if attn is None and rec_attn is not None:
        if _names_code(rec_attn):
            held["attn_implementation"] = rec_attn
        else:
            attn = rec_attn
    return attn, kernels, held


def hold_back(model, held: dict, source: str) -> None:
    """Show in the plan what the checkpoint recorded and this load did not apply."""
    if held and model.binding is not None:
        model.binding = model.binding.noting(
            f"recorded in {source}, not applied: {held}; pass kernels={FROM_CONFIG!r} (CLI: --kernels "
            f"{FROM_CONFIG}) to apply it")
