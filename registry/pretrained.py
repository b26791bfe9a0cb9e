"""`from_pretrained` and `explain`: build a registered architecture from a checkpoint and bind it.

The architecture is looked up by `model_type` among what plugins registered (built-ins:
llama, mistral, qwen2). The model is built on the meta device, so `explain` costs no
memory and `from_pretrained` allocates each weight once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kernelhub.models.checkpoint import load_weights, read_config, read_state_dict, resolve_dtype
from kernelhub.registry.bind import bind
from kernelhub.registry.errors import CheckpointError, suggestion
from kernelhub.registry.manager import get_registry
from kernelhub.registry.plan import BindingPlan


def build_model(config: dict, *, output_attentions: bool = False):
    """An unmaterialised (meta device) model for `config`, chosen by its model_type."""
    archs = get_registry().architectures
    model_type = config.get("model_type")
    if model_type not in archs:
        raise CheckpointError(f"unsupported model_type {model_type!r}.{suggestion(str(model_type), archs)} "
                              f"Supported: {', '.join(sorted(archs))} (plugins can add more)")
    if output_attentions:
        config = {**config, "output_attentions": True}
    with torch.device("meta"):
        return archs[model_type](config)


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


def _requested(config, attn_implementation, kernels):
    recorded = config.get("kernelhub") or {}
    return (attn_implementation if attn_implementation is not None else recorded.get("attn_implementation"),
            kernels if kernels is not None else recorded.get("kernels"))


def from_pretrained(path, attn_implementation=None, kernels=None, *, dtype=None, device=None,
                    mode: str = "inference", output_attentions: bool = False, lock=None):
    """Load a Hugging Face-layout checkpoint directory (or a .gguf file) and bind it.

    `attn_implementation=None` uses what `save_pretrained` recorded, else sdpa (falling
    back to eager). `dtype=None` uses the checkpoint's dtype. `lock` pins Hub kernels
    (see `bind`).

    >>> model = kernelhub.from_pretrained("path/to/checkpoint", attn_implementation="sdpa")  # doctest: +SKIP
    >>> print(model.binding)                                                                 # doctest: +SKIP
    """
    path = checkpoint_dir(path)
    config = read_config(path)
    model = build_model(config, output_attentions=output_attentions)
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device or "cpu")
    attn, kern = _requested(config, attn_implementation, kernels)
    # Bind before loading weights: a bad request fails fast, before any tensor is read.
    bind(model, attn, kern, device=device, dtype=dtype, mode=mode, lock=lock)
    load_weights(model, read_state_dict(path), dtype=dtype, device=device, source=str(Path(path)))
    model.train(mode == "training")
    return model


def explain(path, attn_implementation=None, kernels=None, *, dtype=None, device="cpu",
            mode: str = "inference", lock=None) -> BindingPlan:
    """The BindingPlan `from_pretrained` would produce, without reading any weights.

    >>> print(kernelhub.explain("path/to/checkpoint", attn_implementation="flex"))  # doctest: +SKIP
    """
    if Path(path).suffix == ".gguf":  # the metadata is enough: no dequantisation for a plan
        from kernelhub.models.gguf import read_gguf_config

        config = read_gguf_config(path)
    else:
        config = read_config(path)
    model = build_model(config)
    attn, kern = _requested(config, attn_implementation, kernels)
    return bind(model, attn, kern, device=device, dtype=resolve_dtype(dtype, config), mode=mode, lock=lock)
