"""Reading and writing checkpoints in the Hugging Face layout.

`config.json` plus `model.safetensors`, or a sharded `model.safetensors.index.json`.
Every failure names the file and what is wrong with it. Weight files never leave the
checkpoint directory, and their headers alone (`weight_shapes`) let a config be checked
against its weights before any tensor is read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kernelhub.declare.config_schema import found
from kernelhub.declare.errors import CheckpointError, ConfigError
from kernelhub.declare.fused import join_fused, split_fused
from kernelhub.declare.json_limits import read_json_file
from kernelhub.declare.log import progress

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

logger = logging.getLogger(__name__)


def config_path(path) -> Path:
    """The config.json of a checkpoint directory (or `path` itself when it is a file)."""
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def read_config(path) -> dict:
    """The config.json of a checkpoint directory, as a dict (a JSON object, else `ConfigError`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist")
    file = config_path(path)
    if not file.is_file():
        raise CheckpointError(f"{str(path)!r} has no config.json; a checkpoint directory needs config.json "
                              "and model.safetensors (or model.safetensors.index.json)")
    return read_json_object(file, ConfigError, "the config")


# config.json, the safetensors index, tokenizer.json and its side files: a large vocabulary's tokenizer.json
# is tens of MB, nothing kernelhub reads here comes near this.
MAX_JSON_BYTES = 256 << 20


def read_json_object(file: Path, error=CheckpointError, what: str = "the top level") -> dict:
    """The JSON object in `file`; `CheckpointError` for invalid JSON (too large, nested too deep, a key
    twice), `error` for another JSON value."""
    data = read_json_file(file, str(file), CheckpointError, max_bytes=MAX_JSON_BYTES)
    if not isinstance(data, dict):
        raise error(f"{file}: {what} is {found(data)}; allowed: a JSON object")
    return data


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
    """The safetensors files of a checkpoint directory, single file or sharded.

    Every file is checked to lie inside the checkpoint directory (see `shard_file`), so a
    hostile index cannot make us read `../../elsewhere.safetensors`.
    """
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [shard_file(path, "model.safetensors", f"{path}: model.safetensors")]
    if index.is_file():
        shards = index_shards(index)
        files = [shard_file(path, shard, f"{index}: tensor {tensor!r} names shard {shard!r}")
                 for shard, tensor in shards.items()]
        missing = [shard for shard, file in zip(shards, files) if not file.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that do not exist: {', '.join(missing)}")
        return files
    raise CheckpointError(f"{path} has no weights: expected model.safetensors or model.safetensors.index.json")


def index_shards(index: Path) -> dict[str, str]:
    """Each shard file named by a safetensors index, with the first tensor it holds (for messages)."""
    data = read_json_file(index, f"{index} (a safetensors index)", CheckpointError, max_bytes=MAX_JSON_BYTES)
    if not isinstance(data, dict):
        raise CheckpointError(f"{index} is not a valid safetensors index: it is {found(data)}; allowed: "
                              "a JSON object with a 'weight_map'")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} is not a valid safetensors index: 'weight_map' is {found(weight_map)}; "
                              "allowed: a non-empty object mapping tensor names to shard file names")
    shards = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: tensor {tensor!r} names shard {found(shard)}; allowed: a file name")
        shards.setdefault(shard, tensor)
    return dict(sorted(shards.items()))


def shard_file(root: Path, name: str, what: str) -> Path:
    """`root / name`, refused (naming `what`) unless it stays inside the checkpoint directory.

    Refused: empty names, absolute paths, `..`, backslashes, and any name whose real path
    (symlinks followed) is outside `root`. The one exception is the Hugging Face cache
    layout, whose `snapshots/<commit>/` files are symlinks to the repository's own `blobs/`.

    >>> shard_file(Path("ckpt"), "../../elsewhere.safetensors", "index: tensor 'w'")
    Traceback (most recent call last):
        ...
    kernelhub.declare.errors.CheckpointError: index: tensor 'w', which is refused: it climbs out with '..'; ...
    """
    parts = PurePosixPath(name).parts
    why = None
    if not name or "\\" in name or "\0" in name:
        why = "it is not a plain relative file name"
    elif PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        why = "it is an absolute path"
    elif ".." in parts:
        why = "it climbs out with '..'"
    else:
        real, base = (root / name).resolve(), root.resolve()
        blobs = base.parent.parent / "blobs" if base.parent.name == "snapshots" else None
        if not (real.is_relative_to(base) or (blobs is not None and real.is_relative_to(blobs))):
            why = f"its real path {str(real)!r} is outside the checkpoint directory"
    if why:
        raise CheckpointError(f"{what}, which is refused: {why}; shards must be files inside {root}")
    return root / name


def weight_shapes(path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape, from the safetensors headers only: no tensor data is read.

    Lets a config be checked against its weights before a model is built.
    """
    shapes = {}
    for file in weight_files(Path(path)):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from None
    return shapes


def read_state_dict(path) -> dict:
    """All tensors of a checkpoint directory, by name; a progress bar counts the bytes, shard by shard."""
    files = weight_files(Path(path))
    state = {}
    sizes = [file.stat().st_size for file in files]
    with progress(desc="loading weights", total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024) as bar:
        for file, size in zip(files, sizes):
            try:
                state.update(load_file(file))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from None
            bar.update(size)
    logger.debug("read %d tensors from %d file(s) in %s", len(state), len(files), path)
    return state


def load_weights(model: torch.nn.Module, state: dict, *, dtype, device, source: str = "checkpoint"):
    """Copy a checkpoint's `state` into `model` (built on the meta device), checking names and shapes.

    Names and shapes are checked in the checkpoint's own naming (see `to_checkpoint`:
    models that fuse projections declare `FUSED`, or convert their whole layout), so
    errors name the tensor as it is in the file. The model is materialised on `device` in
    `dtype`; tied weights stay tied.
    """
    expected = check_weight_names(model, {n: tuple(t.shape) for n, t in state.items()}, source)
    return materialize(model, from_checkpoint(model, {n: state[n] for n in expected}), dtype=dtype, device=device)


def ties(model) -> list[tuple[str, str]]:
    """(alias, canonical name) of every parameter reachable under two names."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    return [(name, canonical[id(p)]) for name, p in model.named_parameters(remove_duplicate=False)
            if canonical[id(p)] != name]


def check_weight_names(model, shapes: dict, source: str) -> dict:
    """The checkpoint tensors `model` needs ({name: meta tensor}, the file's naming), checked against
    `shapes` ({name: shape}, from the file): none missing, none unused, every shape right."""
    tied = {alias for alias, _ in ties(model)}
    ours = {k: v for k, v in model.state_dict().items() if k not in tied}
    expected = to_checkpoint(model, ours)
    missing = [n for n in expected if n not in shapes]
    ignored = set(getattr(model, "checkpoint_keys_to_ignore", ()))
    unexpected = [n for n in shapes if n not in expected and n not in tied and n not in ignored]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s) the model needs: {', '.join(missing[:8])}")
    if unexpected:
        raise CheckpointError(f"{source} has {len(unexpected)} weight(s) the model does not use: "
                              f"{', '.join(unexpected[:8])}")
    for name, want in expected.items():
        if tuple(shapes[name]) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(shapes[name])}, "
                                  f"the model expects {tuple(want.shape)}")
    return expected


def materialize(model, state: dict, *, dtype, device):
    """Allocate `model` (built on the meta device) on `device` in `dtype` and copy `state` (the model's
    own names and shapes) into it; tied weights stay tied, non-persistent buffers are recomputed."""
    tied = ties(model)
    model.to_empty(device=device)
    model.to(dtype)
    for alias, target in tied:  # to_empty gives every name its own tensor: tie them again
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
    """Write config.json (with the model's binding request), generation_config.json (when the
    model has generation defaults) and model.safetensors."""
    if getattr(model, "tensor_parallel", None) is not None:
        raise CheckpointError("save_pretrained of a tensor-parallel model would write one rank's shards; save the "
                              "checkpoint from a model loaded without tp_plan")
    packed = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
    if packed:  # safetensors of float weights is the format; packed blocks would not load back
        raise CheckpointError(f"save_pretrained writes float weights, and this model keeps GGUF blocks packed "
                              f"({', '.join(packed)}); load it with dequantize=True to save it, or keep the .gguf file")
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
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.to_dict():  # a reload generates the same way
        (path / "generation_config.json").write_text(json.dumps(generation.to_dict(), indent=2, sort_keys=True) + "\n")
    state = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights are stored once, like transformers does
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous().cpu()
    save_file(to_checkpoint(model, state), os.fspath(path / "model.safetensors"), metadata={"format": "pt"})


def to_checkpoint(model, state: dict) -> dict:
    """`state` (the model's names and layout) in the checkpoint file's names and layout.

    A model converts its own layout by defining `model_to_checkpoint(state) -> state` and
    its inverse `checkpoint_to_model(state) -> state`; both must work on meta tensors (load
    checks names and shapes in the file's layout before reading anything). Without them,
    `FUSED` projections are split (`split_fused`). A Qwen3-MoE-style model that also fuses
    q/k/v would write:

        def model_to_checkpoint(self, state):
            return split_per_expert(split_fused(self, state))

        def checkpoint_to_model(self, state):
            return join_fused(self, fuse_per_expert(state))

    >>> class M:
    ...     def model_to_checkpoint(self, state):
    ...         return {k.replace("fused", "file"): v for k, v in state.items()}
    >>> sorted(to_checkpoint(M(), {"l.fused": torch.ones(1)}))
    ['l.file']
    """
    convert = getattr(model, "model_to_checkpoint", None)
    return convert(state) if convert is not None else split_fused(model, state)


def from_checkpoint(model, state: dict) -> dict:
    """A checkpoint's `state` in the model's names and layout; the inverse of `to_checkpoint`."""
    convert = getattr(model, "checkpoint_to_model", None)
    return convert(state) if convert is not None else join_fused(model, state)
