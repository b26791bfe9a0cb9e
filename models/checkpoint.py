"""Reading and writing checkpoints in the Hugging Face layout.

`config.json` plus `model.safetensors`, or a sharded `model.safetensors.index.json`.
Every failure names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kernelhub.registry.errors import CheckpointError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def read_config(path) -> dict:
    """The config.json of a checkpoint directory, as a dict."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json; a checkpoint directory needs config.json "
                              "and model.safetensors (or model.safetensors.index.json)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None


def resolve_dtype(dtype, config: dict) -> torch.dtype:
    """None/"auto" -> the checkpoint's dtype (float32 if unrecorded); strings and torch dtypes accepted."""
    if dtype is None or dtype == "auto":
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPES:
            raise CheckpointError(f"unsupported dtype {dtype!r}; valid: {', '.join(sorted(DTYPES))}")
        dtype = DTYPES[dtype.removeprefix("torch.")]
    if dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype}; valid: float32, bfloat16, float16")
    return dtype


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, single file or sharded."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})") from None
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {', '.join(missing)}")
        return [path / s for s in shards]
    raise CheckpointError(f"{path} has no weights: expected model.safetensors or model.safetensors.index.json")


def read_state_dict(path) -> dict:
    """All tensors of a checkpoint directory, by name."""
    state = {}
    for file in weight_files(Path(path)):
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from None
    return state


def load_weights(model: torch.nn.Module, state: dict, *, dtype, device, source: str = "checkpoint"):
    """Copy a checkpoint's `state` into `model` (built on the meta device), checking names and shapes.

    Names and shapes are checked in the checkpoint's own naming (models that fuse
    projections convert with `from_hf_state_dict`/`to_hf_state_dict`), so errors name
    the tensor as it is in the file. The model is materialised on `device` in `dtype`;
    tied weights stay tied.
    """
    canonical = {id(p): name for name, p in model.named_parameters()}
    ties = [(name, canonical[id(p)]) for name, p in model.named_parameters(remove_duplicate=False)
            if canonical[id(p)] != name]
    tied = {alias for alias, _ in ties}
    ours = {k: v for k, v in model.state_dict().items() if k not in tied}
    to_file = getattr(model, "to_hf_state_dict", None)
    expected = to_file(ours) if to_file else ours
    missing = [n for n in expected if n not in state]
    ignored = set(getattr(model, "checkpoint_keys_to_ignore", ()))
    unexpected = [n for n in state if n not in expected and n not in tied and n not in ignored]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s) the model needs: {', '.join(missing[:8])}")
    if unexpected:
        raise CheckpointError(f"{source} has {len(unexpected)} weight(s) the model does not use: "
                              f"{', '.join(unexpected[:8])}")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                  f"the model expects {tuple(want.shape)}")
    from_file = getattr(model, "from_hf_state_dict", None)
    state = from_file({n: state[n] for n in expected}) if from_file else state
    model.to_empty(device=device)
    model.to(dtype)
    for alias, target in ties:  # to_empty gives every name its own tensor: tie them again
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(target))
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if name in state:
                param.copy_(state[name])
    if hasattr(model, "reset_buffers"):
        model.reset_buffers()
    return model


def save_pretrained(model, path) -> None:
    """Write config.json (with the model's binding request) and model.safetensors."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(model.config.raw)
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    request = getattr(model, "binding_request", None)
    if request:
        config["kernelhub"] = request
    else:
        config.pop("kernelhub", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights are stored once, like transformers does
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous().cpu()
    convert = getattr(model, "to_hf_state_dict", None)
    save_file(convert(state) if convert else state, os.fspath(path / "model.safetensors"), metadata={"format": "pt"})
