"""`from_pretrained` and `explain`: build a registered architecture from a checkpoint and bind it.

The architecture is looked up by `model_type` among what plugins registered (built-ins:
llama, mistral, qwen2, bert). Its config is checked field by field, and (for
`from_pretrained`) against the weights' headers, before the model is built on the meta
device, so `explain` costs no memory and `from_pretrained` allocates each weight once.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch

from kernelhub.models.checkpoint import (config_path, load_weights, read_config, read_state_dict, resolve_dtype,
                                         weight_shapes)
from kernelhub.models.config_schema import found
from kernelhub.models.generation_config import GenerationConfig
from kernelhub.registry.bind import bind
from kernelhub.registry.modes import parse_mode
from kernelhub.declare.errors import CheckpointError, ConfigError, suggestion
from kernelhub.registry.plugins import get_registry
from kernelhub.registry.plan import BindingPlan


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


def checkpoint_dir(path) -> Path:
    """A checkpoint directory for `path`: itself, or the cached conversion of a .gguf file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from kernelhub.models.gguf import convert_gguf

        return convert_gguf(path)
    return path


def load_tokenizer(path, model=None, **kwargs):
    """The tokenizer of a checkpoint directory (tokenizer.json) or of a .gguf file.

    With `model`, also checks that every token id the tokenizer can produce has an
    embedding row, so a mismatched pair fails here rather than as an index error later.

    >>> tok = kernelhub.load_tokenizer("path/to/model.gguf")   # doctest: +SKIP
    >>> tok(["Hello", "Hi there"])["input_ids"]                # doctest: +SKIP
    """
    from kernelhub.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(checkpoint_dir(path), **kwargs)
    if model is not None:
        rows = model.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > rows:
            raise CheckpointError(f"tokenizer of {path} has {tokenizer.vocab_size} tokens but the model's embedding "
                                  f"has {rows} rows: they do not belong together")
    return tokenizer


def _requested(config, attn_implementation, kernels, source):
    recorded = config.get("kernelhub") or {}
    if not isinstance(recorded, dict):
        raise ConfigError(f"{source}: 'kernelhub' is {found(recorded)}; allowed: an object (the binding request "
                          "save_pretrained records)")
    return (attn_implementation if attn_implementation is not None else recorded.get("attn_implementation"),
            kernels if kernels is not None else recorded.get("kernels"))


SINGLE_DEVICE_MAPS = '"auto", "cpu", "cuda", "cuda:N", a torch.device, or {"": device}'


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


def _dtype_and_device(dtype, torch_dtype, device, device_map):
    """Fold transformers' spellings (`torch_dtype`, `device_map`) into `dtype` and `device`."""
    if torch_dtype is not None:
        if dtype is not None:
            raise ValueError(f"pass dtype={dtype!r} or torch_dtype={torch_dtype!r}, not both "
                             "(torch_dtype is the deprecated name of dtype)")
        warnings.warn("torch_dtype is deprecated; use dtype", DeprecationWarning, stacklevel=3)
        dtype = torch_dtype
    if device_map is not None:
        if device is not None:
            raise ValueError(f"pass device={device!r} or device_map={device_map!r}, not both")
        device = resolve_device_map(device_map)
    return dtype, torch.device(device or "cpu")


def from_pretrained(path, attn_implementation=None, kernels=None, *, dtype=None, device=None,
                    mode: str = "inference", output_attentions: bool = False, lock=None, torch_dtype=None,
                    device_map=None):
    """Load a Hugging Face-layout checkpoint directory (or a .gguf file) and bind it.

    `attn_implementation=None` uses what `save_pretrained` recorded, else sdpa (falling
    back to eager). `dtype=None` uses the checkpoint's dtype (`torch_dtype` is its deprecated
    transformers name). `device_map` is transformers' spelling of one device: "auto" (cuda if
    available, else cpu), "cpu", "cuda:0", a torch.device or {"": device}. `lock` pins Hub
    kernels (see `bind`). `model.generation_config` comes from generation_config.json when
    the checkpoint has one.

    >>> model = kernelhub.from_pretrained("path/to/checkpoint", attn_implementation="sdpa")  # doctest: +SKIP
    >>> print(model.binding)                                                                 # doctest: +SKIP
    """
    dtype, device = _dtype_and_device(dtype, torch_dtype, device, device_map)
    path = checkpoint_dir(path)
    config = read_config(path)
    source = str(config_path(path))
    arch, parsed = parse_config(config, source=source, output_attentions=output_attentions)
    attn, kern = _requested(config, attn_implementation, kernels, source)
    dtype = resolve_dtype(dtype, config)
    check = getattr(parsed, "check_weights", None)
    if check is not None:  # sizes against the weights' headers: a wrong config fails before anything is built
        check(weight_shapes(path), source=source, weights=str(path))
    generation_config = GenerationConfig.from_checkpoint(path, config) if path.is_dir() else None
    with torch.device("meta"):
        model = arch(parsed)
    if generation_config is not None and hasattr(model, "generation_config"):
        model.generation_config = generation_config
    # Bind before loading weights: a bad request fails fast, before any tensor is read.
    bind(model, attn, kern, device=device, dtype=dtype, mode=mode, lock=lock)
    load_weights(model, read_state_dict(path), dtype=dtype, device=device, source=str(Path(path)))
    model.train(parse_mode(mode).training)
    return model


def explain(path, attn_implementation=None, kernels=None, *, dtype=None, device="cpu",
            mode: str = "inference", lock=None) -> BindingPlan:
    """The BindingPlan `from_pretrained` would produce, without reading any weights.

    The config is checked field by field (types and signs) but not against weights, which
    need not be present.

    >>> print(kernelhub.explain("path/to/checkpoint", attn_implementation="flex"))  # doctest: +SKIP
    """
    if Path(path).suffix == ".gguf":  # the metadata is enough: no dequantisation for a plan
        from kernelhub.models.gguf import read_gguf_config

        config, source = read_gguf_config(path), f"config derived from GGUF file {path}"
    else:
        config, source = read_config(path), str(config_path(path))
    model = build_model(config, source=source)
    attn, kern = _requested(config, attn_implementation, kernels, source)
    return bind(model, attn, kern, device=device, dtype=resolve_dtype(dtype, config), mode=mode, lock=lock)
