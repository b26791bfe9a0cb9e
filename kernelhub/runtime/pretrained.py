"""`from_pretrained` and `explain`: build a registered architecture from a checkpoint and bind it.

The architecture is looked up by `model_type` among what plugins registered (built-ins:
llama, mistral, qwen2, bert). Its config is checked field by field, and (for
`from_pretrained`) against the weights' headers, before the model is built on the meta
device, so `explain` costs no memory and `from_pretrained` allocates each weight once.
"""

from __future__ import annotations

import inspect
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kernelhub.checkpoint.hf_layout import (check_weight_names, config_path, load_weights, materialize, read_config,
                                         read_state_dict, resolve_dtype, weight_shapes)
from kernelhub.checkpoint.generation_config import GenerationConfig
from kernelhub.checkpoint.gguf import checkpoint_shapes, close_gguf_files, convert_gguf
from kernelhub.checkpoint.hub_checkpoint import resolve_checkpoint
from kernelhub.runtime.tensor_parallel import install_boundaries, plan_shards, shard_model
from kernelhub.runtime.tensor_parallel_load import device_mesh_for, read_local_state
from kernelhub.declare.devices import available_devices
from kernelhub.registry.bind import bind
from kernelhub.runtime.gguf_packing import pack, packing
from kernelhub.runtime.recorded_request import hold_back, requested
from kernelhub.registry.modes import parse_mode
from kernelhub.declare.errors import CheckpointError, KernelhubError, TensorParallelError, suggestion
from kernelhub.declare.layer import layer_name
from kernelhub.registry.plugins import get_registry
from kernelhub.registry.plan import BindingPlan
from kernelhub.registry.hub.lockfile import KernelLock
from kernelhub.registry.modes import ModeLike
from kernelhub.registry.request import AttnImplementation, Kernels

if TYPE_CHECKING:
    from kernelhub.checkpoint.tokenizer import Tokenizer


def architecture(config: dict) -> type:
    """The registered model class for `config["model_type"]`."""
    archs = get_registry().architectures
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in archs:
        raise CheckpointError(f"unsupported model_type {model_type!r}.{suggestion(str(model_type), archs)} "
                              f"Supported: {', '.join(sorted(archs))} (plugins can add more)")
    return archs[model_type]


def parse_config(config: dict, *, source: str = "config", output_attentions: bool = False):
    """The model class for `config` and the config parsed by its `config_class.from_dict`.

    Parsing checks every field the model uses (`ConfigError` naming `source` and the
    field); architectures without a `config_class` get the dict unchanged.

    >>> parse_config({"model_type": "llama", "hidden_size": "64"}, source="config.json")
    Traceback (most recent call last):
        ...
    kernelhub.declare.errors.ConfigError: config.json: 'hidden_size' is '64' (str); allowed: a positive int
    """
    arch = architecture(config)
    if output_attentions:
        config = {**config, "output_attentions": True}
    parse = getattr(getattr(arch, "config_class", None), "from_dict", None)
    if parse is None:
        return arch, config
    takes_source = "source" in inspect.signature(parse).parameters  # a plugin's from_dict may not
    return arch, parse(config, source=source) if takes_source else parse(config)


def build_model(config: dict, *, output_attentions: bool = False, source: str = "config"):
    """An unmaterialised (meta device) model for `config`, chosen by its model_type."""
    arch, parsed = parse_config(config, source=source, output_attentions=output_attentions)
    with torch.device("meta"):
        return arch(parsed)


def checkpoint_dir(path, weights: bool = True) -> Path:
    """A checkpoint directory for `path`: itself, or the cached conversion of a .gguf file (with its
    weights dequantised, or `weights=False`: config and tokenizer files only)."""
    path = Path(path)
    if path.suffix == ".gguf":
        # The architecture's own checks too (an odd head_dim, say), before anything is dequantised.
        return convert_gguf(path, check_config=lambda config, source: parse_config(config, source=source),
                            weights=weights)
    return path


def load_tokenizer(path: str | os.PathLike, model: torch.nn.Module | None = None, *, revision: str | None = None,
                   gguf_file: str | None = None, token: str | bool | None = None,
                   cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                   **kwargs: Any) -> Tokenizer:
    """The tokenizer of a checkpoint directory (tokenizer.json), a .gguf file or a Hub model id.

    A Hub id (`"org/name"`, `"org/name@revision"`) downloads the tokenizer files only, as
    `from_pretrained` does (see there for `revision`, `gguf_file`, `token`, `cache_dir`,
    `local_files_only`). With `model`, also checks that every token id the tokenizer can
    produce has an embedding row, so a mismatched pair fails here rather than as an index error later.

    >>> tok = kernelhub.load_tokenizer("path/to/model.gguf")   # doctest: +SKIP
    >>> tok(["Hello", "Hi there"])["input_ids"]                # doctest: +SKIP
    >>> tok = kernelhub.load_tokenizer("org/name@v1")          # doctest: +SKIP
    """
    from kernelhub.checkpoint.tokenizer import Tokenizer

    path = resolve_checkpoint(path, revision=revision, gguf_file=gguf_file, token=token, cache_dir=cache_dir,
                              local_files_only=local_files_only, files="tokenizer")
    tokenizer = Tokenizer.from_file(checkpoint_dir(path, weights=False), **kwargs)
    if model is not None:
        rows = model.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > rows:
            raise CheckpointError(f"tokenizer of {path} has {tokenizer.vocab_size} tokens but the model's embedding "
                                  f"has {rows} rows: they do not belong together")
    return tokenizer


DEFAULT_EXPERTS = ("grouped_mm", "eager")


def has_experts(model) -> bool:
    """Whether `model` has a declared `Experts` layer (a mixture-of-experts block)."""
    return model is not None and any(layer_name(m) == "Experts" for m in model.modules())


def with_experts_implementation(model, asked, kernels, experts_implementation):
    """`kernels` with transformers' `experts_implementation=` folded in as `kernels["Experts"]`.

    Neither given, a model with `Experts` layers gets transformers' default, `grouped_mm`
    (the reference loop where it cannot serve, e.g. training).

    `asked` is the caller's own `kernels=` (a value recorded by save_pretrained may be
    overridden; one the caller passed may not be contradicted).

    >>> with_experts_implementation(None, {"Experts": "batched_mm"}, {"Experts": "batched_mm"}, "grouped_mm")
    Traceback (most recent call last):
        ...
    kernelhub.declare.errors.KernelhubError: experts_implementation='grouped_mm' and kernels['Experts']='batched_mm' ...
    """
    if experts_implementation is None:
        if (kernels is None or (isinstance(kernels, dict) and "Experts" not in kernels)) and has_experts(model):
            # transformers' default: grouped GEMMs, with the reference loop where they cannot serve
            return {**(kernels or {}), "Experts": list(DEFAULT_EXPERTS)}
        return kernels
    mine = asked.get("Experts") if isinstance(asked, dict) else None
    if mine is not None and mine != experts_implementation:
        raise KernelhubError(f"experts_implementation={experts_implementation!r} and kernels['Experts']={mine!r} "
                             "ask for different Experts kernels; pass one of them")
    if not has_experts(model):
        raise KernelhubError(f"experts_implementation={experts_implementation!r}: this model has no Experts layer "
                             "(no mixture-of-experts block); drop the argument")
    if kernels is not None and not isinstance(kernels, dict):
        return kernels  # bind reports the malformed kernels= itself
    return {**(kernels or {}), "Experts": experts_implementation}


SINGLE_DEVICE_MAPS = '"auto", "cpu", "cuda", "cuda:N", a torch.device, or {"": device}'


def usable_device(device, what: str = "device", *, probe: bool = True) -> torch.device:
    """`device` as a torch.device this process can allocate on; one `KernelhubError` naming it, why, and
    what is available otherwise (torch's own is a bare AssertionError on a CPU-only build).
    `probe=False` checks the spelling only.

    >>> usable_device("cpu")
    device(type='cpu')
    >>> usable_device("tpu:99")
    Traceback (most recent call last):
        ...
    kernelhub.declare.errors.KernelhubError: device='tpu:99' is not a device torch knows; available: cpu...
    """
    shown = str(device) if isinstance(device, torch.device) else device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise KernelhubError(f"{what}={shown!r} is not a device torch knows; available: "
                             f"{', '.join(available_devices())}") from None
    if not probe or dev.type in ("cpu", "meta"):
        return dev
    try:
        torch.empty(0, device=dev)
    except (AssertionError, RuntimeError) as e:  # AssertionError: "Torch not compiled with CUDA enabled"
        why = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise KernelhubError(f"{what}={shown!r} cannot be used in this process ({why}); available: "
                             f"{', '.join(available_devices())}") from None
    return dev


def resolve_device_map(device_map) -> torch.device:
    """The one device a single-device `device_map` names (kernelhub does not split a model across devices).

    >>> resolve_device_map({"": "cpu"})
    device(type='cpu')
    >>> resolve_device_map({"model.layers.0": 0, "lm_head": 1})
    Traceback (most recent call last):
        ...
    ValueError: device_map={'model.layers.0': 0, 'lm_head': 1} places modules on several devices; ...
    """
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    value = device_map
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map={device_map!r} places modules on several devices; kernelhub loads a "
                             f"model onto one device. Supported: {SINGLE_DEVICE_MAPS} "
                             "(tensor parallel: tp_plan='auto' under torchrun)")
        value = device_map[""]
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r} is not a device; supported: {SINGLE_DEVICE_MAPS}") from None


def _dtype_and_device(dtype, torch_dtype, device, device_map, default="cpu"):
    """Fold transformers' spellings (`torch_dtype`, `device_map`) into `dtype` and `device`
    (`default` when neither names one; None lets a tensor-parallel load pick each rank's, and then the
    ranks check their devices together, so only the spelling is checked here)."""
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError(f"pass dtype={dtype!r} or torch_dtype={torch_dtype!r}, not both "
                             "(torch_dtype is the deprecated name of dtype)")
        warnings.warn("torch_dtype is deprecated; use dtype", DeprecationWarning, stacklevel=3)
        dtype = torch_dtype
    what = "device"
    if device_map is not None:
        if device is not None:
            raise ValueError(f"pass device={device!r} or device_map={device_map!r}, not both")
        device, what = resolve_device_map(device_map), "device_map"
    device = device or default
    return dtype, usable_device(device, what, probe=default is not None) if device is not None else None


def from_pretrained(path: str | os.PathLike, attn_implementation: AttnImplementation | None = None,
                    kernels: Kernels | str | None = None, *, dtype: torch.dtype | str | None = None,
                    device: torch.device | str | None = None, mode: ModeLike = "inference",
                    output_attentions: bool = False, lock: KernelLock | str | os.PathLike | None = None,
                    torch_dtype: torch.dtype | str | None = None,
                    device_map: str | int | torch.device | dict[str, str | int | torch.device] | None = None,
                    experts_implementation: str | None = None, tp_plan: str | dict[str, str] | None = None,
                    tp_size: int | None = None, device_mesh: torch.distributed.device_mesh.DeviceMesh | None = None,
                    verify: bool = True, dequantize: bool | None = None, revision: str | None = None,
                    gguf_file: str | None = None, token: str | bool | None = None,
                    cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> torch.nn.Module:
    """Load a Hugging Face-layout checkpoint directory, a .gguf file or a Hub model id, and bind it.

    A local path that exists wins; otherwise `"org/name"` (or `"org/name@revision"`, or
    `revision=`: a branch, tag or commit) is downloaded from the Hugging Face Hub into its cache,
    as transformers does: `gguf_file` names a .gguf file in the repo, `token`, `cache_dir` and
    `local_files_only` are huggingface_hub's, and `HF_HUB_OFFLINE=1` loads from the cache only.
    Only config, weights (safetensors), generation config and tokenizer files are downloaded:
    remote code (`*.py`, a config's `auto_map`) is never downloaded or run.

    `attn_implementation=None` uses what `save_pretrained` recorded, else sdpa (falling
    back to eager). `dtype=None` uses the checkpoint's dtype (`torch_dtype` is its deprecated
    transformers name). `device_map` is transformers' spelling of one device: "auto" (cuda if
    available, else cpu), "cpu", "cuda:0", a torch.device or {"": device}. `lock` pins Hub
    kernels (see `bind`). `model.generation_config` comes from generation_config.json when
    the checkpoint has one. `verify=False` skips kernel conformance probes (see `bind`).
    `experts_implementation` is transformers' spelling of `kernels={"Experts": ...}` ("eager",
    "grouped_mm", "batched_mm", or any Experts kernel); with neither, `Experts` layers get
    ["grouped_mm", "eager"], as transformers defaults to grouped_mm.
    `tp_plan="auto"` (or a plan dict), inside an initialised process group (torchrun), loads
    this rank's shards only (see `kernelhub.runtime.tensor_parallel`); `tp_size` and
    `device_mesh` (1-D, or with a "tp" dimension) say which ranks share the model.
    A .gguf file keeps its quantised projection and embedding weights packed by default, in
    `QuantizedLinear`/`QuantizedEmbedding` layers bound to the `gguf` kernels (see
    `kernelhub.checkpoint.gguf_packed`), where a packed kernel serves the device; training, `tp_plan`
    or another device dequantise, and the plan says why. `dequantize=True` loads float weights (what
    transformers computes, bit for bit); `dequantize=False` insists on packed blocks.

    >>> model = kernelhub.from_pretrained("path/to/checkpoint", attn_implementation="sdpa")  # doctest: +SKIP
    >>> print(model.binding)                                                                 # doctest: +SKIP
    >>> model = kernelhub.from_pretrained("path/to/checkpoint", tp_plan="auto")  # doctest: +SKIP
    >>> model = kernelhub.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct@main")       # doctest: +SKIP
    >>> model = kernelhub.from_pretrained("org/name", gguf_file="model-Q4_K_M.gguf")       # doctest: +SKIP
    """
    if tp_plan is None and (tp_size is not None or device_mesh is not None):
        raise TensorParallelError("tp_size= and device_mesh= shard a model only together with tp_plan='auto' "
                                  "(or a plan dict); pass tp_plan")
    dtype, device = _dtype_and_device(dtype, torch_dtype, device, device_map,
                                      default=None if tp_plan is not None else "cpu")
    mesh = None
    if tp_plan is not None:  # the group and the devices are checked before anything is read
        if parse_mode(mode).training:
            raise TensorParallelError(f"tp_plan loads for inference only (mode={mode!r}): the gradients of the "
                                      "split layers' inputs are not reduced across ranks; use mode='inference'")
        mesh, device = device_mesh_for(tp_size, device_mesh, device)
    path = resolve_checkpoint(path, revision=revision, gguf_file=gguf_file, token=token, cache_dir=cache_dir,
                              local_files_only=local_files_only)  # a Hub id: downloaded (weights only, no code)
    packed_file, unpacked_note = packing(path, dequantize, mode=mode, tensor_parallel=mesh is not None,
                                         device=device, kernels=kernels)
    gguf = Path(path).suffix == ".gguf"
    path = checkpoint_dir(path, weights=packed_file is None)  # packed: the few float tensors come from the file
    config = read_config(path)
    source = str(config_path(path))
    arch, parsed = parse_config(config, source=source, output_attentions=output_attentions)
    attn, kern, held = requested(config, attn_implementation, kernels, source)
    dtype = resolve_dtype(dtype, config)
    check = getattr(parsed, "check_weights", None)
    if check is not None and mesh is None:  # sizes against the weights' headers, before anything is built
        check(weight_shapes(path) if packed_file is None else checkpoint_shapes(packed_file, config), source=source,
              weights=str(packed_file or path))
    with torch.device("meta"):
        model = arch(parsed)
    # tensor-parallel sizes against the group first (from the config alone), then against the headers
    planned = plan_shards(model, tp_plan, world=mesh.size()) if mesh is not None else None
    if planned is not None:
        shapes = weight_shapes(path)
        if check is not None:
            check(shapes, source=source, weights=str(path))
        # names and global shapes from the headers, then each parameter takes its local shape
        check_weight_names(model, shapes, str(Path(path)))
        shard_model(model, planned, rank=mesh.get_local_rank())
    generation_config = GenerationConfig.from_checkpoint(path, config) if path.is_dir() else None
    if generation_config is not None and hasattr(model, "generation_config"):
        model.generation_config = generation_config
    kern = with_experts_implementation(model, kernels, kern, experts_implementation)
    if packed_file is not None:
        placed, packed_notes = pack(model, packed_file, config)
    # Bind before loading weights: a bad request fails fast, before any tensor is read.
    bind(model, attn, kern, device=device, dtype=dtype, mode=mode, lock=lock, verify=verify)
    hold_back(model, held, source)
    if mesh is not None:
        materialize(model, read_local_state(model, path, model.tensor_parallel), dtype=dtype, device=device)
        install_boundaries(model, mesh)
    elif packed_file is not None:
        from kernelhub.checkpoint.gguf_packed import load_packed

        load_packed(model, packed_file, placed, config, dtype=dtype, device=device, source=str(packed_file))
        for line in packed_notes:
            model.binding = model.binding.noting(line)
    else:
        load_weights(model, read_state_dict(path), dtype=dtype, device=device, source=str(Path(path)))
    if unpacked_note is not None:
        model.binding = model.binding.noting(unpacked_note)
    if gguf:  # what the load needed is copied: unmap the file
        close_gguf_files()
    model.train(parse_mode(mode).training)
    return model


def explain(path: str | os.PathLike, attn_implementation: AttnImplementation | None = None,
            kernels: Kernels | str | None = None, *, dtype: torch.dtype | str | None = None,
            device: torch.device | str = "cpu", mode: ModeLike = "inference",
            lock: KernelLock | str | os.PathLike | None = None, experts_implementation: str | None = None,
            tp_size: int | None = None, tp_rank: int = 0, tp_plan: str | dict[str, str] = "auto",
            dequantize: bool | None = None, revision: str | None = None, gguf_file: str | None = None,
            token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
            local_files_only: bool = False) -> BindingPlan:
    """The BindingPlan `from_pretrained` would produce, without reading any weights.

    A Hub model id downloads config.json only (a .gguf file in the repo with `gguf_file`);
    `revision`, `token`, `cache_dir` and `local_files_only` are as in `from_pretrained`.

    The config is checked field by field (types and signs) but not against weights, which
    need not be present. With `tp_size`, the plan of rank `tp_rank` of a tensor-parallel load
    (local shapes, local head counts, each module's sharding), without a process group. For a .gguf
    file, `dequantize` decides as in `from_pretrained`: the plan shows each packed layer's ggml type
    and kernel, and notes the tensors left dequantised with the reason (from the tensor index alone).

    >>> print(kernelhub.explain("path/to/checkpoint", attn_implementation="flex"))  # doctest: +SKIP
    >>> print(kernelhub.explain("path/to/model.gguf", dequantize=True))             # doctest: +SKIP
    """
    path = resolve_checkpoint(path, revision=revision, gguf_file=gguf_file, token=token, cache_dir=cache_dir,
                              local_files_only=local_files_only, files="config")
    if Path(path).suffix == ".gguf":  # the metadata is enough: no dequantisation for a plan
        from kernelhub.checkpoint.gguf import read_gguf_config

        config, source = read_gguf_config(path), f"config derived from GGUF file {path}"
    else:
        config, source = read_config(path), str(config_path(path))
    model = build_model(config, source=source)
    if tp_size is not None:
        planned = plan_shards(model, tp_plan, world=tp_size)
        if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
            raise TensorParallelError(f"tp_rank={tp_rank!r} is not a rank of tp_size={tp_size}; "
                                      f"valid: 0..{tp_size - 1}")
        shard_model(model, planned, rank=tp_rank)
    attn, kern, held = requested(config, attn_implementation, kernels, source)
    kern = with_experts_implementation(model, kernels, kern, experts_implementation)
    packed_file, unpacked_note = packing(path, dequantize, mode=mode, tensor_parallel=tp_size is not None,
                                         device=device, kernels=kernels)
    notes = [] if unpacked_note is None else [unpacked_note]
    if packed_file is not None:
        _, packed_notes = pack(model, packed_file, config, read=False)
        notes = packed_notes + notes
    bind(model, attn, kern, device=device, dtype=resolve_dtype(dtype, config), mode=mode, lock=lock)
    hold_back(model, held, source)
    for line in notes:
        model.binding = model.binding.noting(line)
    return model.binding
