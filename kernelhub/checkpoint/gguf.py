"""GGUF checkpoints: dequantised weights, config and tokenizer, converted once and cached.

`convert_gguf(path)` reads a GGUF file with the `gguf` package, dequantises every tensor to
float32, maps llama.cpp tensor names to transformers' names (undoing llama.cpp's q/k row
permutation for rotary embeddings in llama files, and the one it adds to Gemma's `1 + weight`
norms), derives `config.json` from the metadata (every mapped key checked first, naming the
file and key; what llama.cpp keeps in code rather than in the file, such as Gemma 3's layer
pattern, as llama.cpp and transformers' own GGUF loader do), and builds a `tokenizer.json`
from the vocabulary (and merges). The result is an ordinary checkpoint directory in the user cache,
so the second load reads safetensors and starts fast. `weights=False` writes the config and
tokenizer files only: a load that keeps the weights packed reads the few float tensors it needs
(norms) from the file itself (`read_tensors(..., names=...)`), and the tokenizer needs no weights.
No transformers at run time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from kernelhub.declare.config_schema import (check_dims, check_layer_count, divides, invalid, non_negative_int,
                                            positive_float, positive_int)
from kernelhub.declare.cache_dir import cache_root
from kernelhub.declare.errors import CheckpointError, ConfigError
from kernelhub.declare.log import progress

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Gemma 3 norms each sublayer's output too, so its ffn_norm is the pre-feed-forward norm.
GEMMA3_BLOCK_NAMES = {
    **BLOCK_NAMES, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}


def open_gguf(path: Path):
    """The GGUF file at `path` (`gguf_reader.GgufFile`); the last two files read are kept open (a load
    reads the index for its config and again for the packed blocks)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    stat = path.stat()
    return _reader(path.resolve(), stat.st_size, stat.st_mtime_ns)


def close_gguf_files() -> None:
    """Drop the GGUF files `open_gguf` keeps open: a file's pages that a load read count in this
    process's resident memory while it stays mapped (Gemma 3 270M: about 280 MB besides the copies)."""
    _reader.cache_clear()


@functools.lru_cache(maxsize=2)
def _reader(path: Path, size: int, mtime_ns: int):
    from kernelhub.checkpoint.gguf_reader import GgufFile

    try:
        return GgufFile(path)
    except Exception as e:  # noqa: BLE001 - the reader raises assorted errors on damaged files
        raise CheckpointError(f"cannot read GGUF file {path}: {type(e).__name__}: {e} "
                              "(truncated download or not a GGUF file?)") from None


def metadata(reader) -> dict:
    """The file's key/value metadata as plain Python values."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one CheckpointError
            raise CheckpointError(f"GGUF metadata field {key!r} is unreadable: {e}") from None
    return out


def hf_config(meta: dict, tensors: dict, source: str = "GGUF file") -> dict:
    """A transformers-style config.json dict from llama.cpp metadata, every mapped key checked.

    `tensors` maps tensor names to shapes (from the file's tensor index, no data read). A bad
    key raises one `ConfigError` naming `source` (the GGUF file) and the metadata key.

    >>> hf_config({"general.architecture": "llama", "llama.block_count": -1}, {}, "GGUF file x.gguf")
    Traceback (most recent call last):
        ...
    kernelhub.declare.errors.ConfigError: GGUF file x.gguf: 'llama.block_count' is -1 (int); allowed: a positive int
    """
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    layers = positive_int(meta, f"{arch}.block_count", source)
    hidden = positive_int(meta, f"{arch}.embedding_length", source)
    heads = positive_int(meta, f"{arch}.attention.head_count", source)
    kv_heads = positive_int(meta, f"{arch}.attention.head_count_kv", source, default=heads)
    divides(source, f"{arch}.attention.head_count_kv", kv_heads, f"{arch}.attention.head_count", heads)
    # llama.cpp's head size: Gemma's is its own (key_length), the others' the rotary dimension.
    head_key = f"{arch}.attention.key_length" if arch == "gemma3" else f"{arch}.rope.dimension_count"
    if head_key not in meta:
        divides(source, f"{arch}.attention.head_count", heads, f"{arch}.embedding_length", hidden)
    check_layer_count(f"{arch}.block_count", layers, tensors, "blk", source, "this file")
    ff = positive_int(meta, f"{arch}.feed_forward_length", source)
    embedding = (f"{arch}.embedding_length", hidden)
    check_dims(tensors, "token_embd.weight", [None, embedding], source, "this file")
    check_dims(tensors, "blk.0.ffn_gate.weight", [(f"{arch}.feed_forward_length", ff), embedding], source, "this file")
    config = {
        "model_type": arch,
        "vocab_size": vocab_size(meta, tensors, arch, source),
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": positive_int(meta, head_key, source, default=hidden // heads),
        "max_position_embeddings": positive_int(meta, f"{arch}.context_length", source, default=2048),
        "rms_norm_eps": positive_float(meta, f"{arch}.attention.layer_norm_rms_epsilon", source),
        "rope_theta": positive_float(meta, f"{arch}.rope.freq_base", source, default=10000.0),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": token_id(meta, "tokenizer.ggml.bos_token_id", source),
        "eos_token_id": token_id(meta, "tokenizer.ggml.eos_token_id", source),
        "dtype": "float32",
    }
    if arch == "gemma3":
        config.update(gemma3_config(meta, config, source))
        del config["rope_theta"]  # per layer type, in rope_parameters
    return config


def gemma3_config(meta: dict, config: dict, source: str) -> dict:
    """The Gemma 3 fields of config.json, as llama.cpp reads the file (`llama_model::load_hparams`).

    llama.cpp keeps some of them in code: every 6th layer is global unless the file has
    `gemma3.attention.sliding_window_pattern` (a period, or one bool per layer, true = sliding),
    sliding layers rotate with base 10000, and scores are scaled by 1/sqrt(head_dim) except on the
    27B (62 layers: 1/sqrt(hidden / heads)). The global rope takes the file's linear scaling
    (4B and larger). transformers' GGUF loader reads the same config from the 270M and 1B files;
    it skips the rope scaling and takes 256 as every model's query_pre_attn_scalar.

    >>> meta = {"gemma3.attention.sliding_window": 512, "gemma3.rope.freq_base": 1e6}
    >>> cfg = gemma3_config(meta, {"num_hidden_layers": 7, "head_dim": 256}, "GGUF file x.gguf")
    >>> cfg["layer_types"][4:], cfg["query_pre_attn_scalar"]
    (['sliding_attention', 'full_attention', 'sliding_attention'], 256)
    """
    layers, key = config["num_hidden_layers"], "gemma3.attention.sliding_window_pattern"
    pattern = meta.get(key, 6)
    if isinstance(pattern, list):
        if len(pattern) != layers or not all(isinstance(p, bool) for p in pattern):
            raise invalid(source, key, pattern, f"a positive int, or gemma3.block_count ({layers}) bools")
        sliding = pattern
    else:
        period = positive_int(meta, key, source, default=6)
        sliding = [bool((i + 1) % period) for i in range(layers)]
    full_rope = {"rope_type": "default", "rope_theta": positive_float(meta, "gemma3.rope.freq_base", source,
                                                                      default=1_000_000.0)}
    scaling = meta.get("gemma3.rope.scaling.type")
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise invalid(source, "gemma3.rope.scaling.type", scaling, "'linear' or 'none'")
        full_rope.update(rope_type="linear", factor=positive_float(meta, "gemma3.rope.scaling.factor", source))
    scalar = config["hidden_size"] // config["num_attention_heads"] if layers == 62 else config["head_dim"]
    if meta.get("gemma3.attention.value_length", config["head_dim"]) != config["head_dim"]:
        raise invalid(source, "gemma3.attention.value_length", meta["gemma3.attention.value_length"],
                      f"gemma3.attention.key_length ({config['head_dim']})")
    return {
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": positive_int(meta, "gemma3.attention.sliding_window", source),
        "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
        "rope_parameters": {"full_attention": full_rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        "query_pre_attn_scalar": scalar,
        "pad_token_id": token_id(meta, "tokenizer.ggml.padding_token_id", source),
    }


def token_id(meta: dict, key: str, source: str) -> int | None:
    """An optional special token id: an int >= 0, or None when absent."""
    return None if meta.get(key) is None else non_negative_int(meta, key, source)


def vocab_size(meta: dict, tensors: dict, arch: str, source: str) -> int:
    """`{arch}.vocab_size`, else the token list's length, else the embedding's rows."""
    if f"{arch}.vocab_size" in meta:
        return positive_int(meta, f"{arch}.vocab_size", source)
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None and not isinstance(tokens, list):
        raise invalid(source, "tokenizer.ggml.tokens", tokens, "a list of strings")
    if tokens:
        return len(tokens)
    rows = tensors.get("token_embd.weight", (0,))[0]
    if not rows:
        raise ConfigError(f"{source} lacks '{arch}.vocab_size' and 'tokenizer.ggml.tokens', and has no "
                          "token_embd.weight to size the vocabulary by")
    return rows


def hf_name(name: str, model_type: str = "llama") -> str:
    if name in TENSOR_NAMES:
        return TENSOR_NAMES[name]
    parts = name.split(".")
    blocks = GEMMA3_BLOCK_NAMES if model_type == "gemma3_text" else BLOCK_NAMES
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in blocks:
        return f"model.layers.{parts[1]}.{blocks[parts[2]]}.{parts[3]}"
    raise CheckpointError(f"GGUF tensor {name!r} has no counterpart in the model")


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (its rotary layout) back to transformers'."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader, config: dict, names: set[str] | None = None) -> dict:
    """All tensors (or those of `names`), dequantised to float32, under transformers' names."""
    from gguf.quants import dequantize

    state = {}
    chosen = [t for t in reader.tensors if names is None or hf_name(t.name, config["model_type"]) in names]
    for t in progress(chosen, desc="dequantising GGUF", unit="tensor", disable=len(chosen) < 32 or None):
        name = hf_name(t.name, config["model_type"])
        try:
            array = dequantize(t.data, t.tensor_type)
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one CheckpointError
            raise CheckpointError(f"cannot dequantise GGUF tensor {t.name!r} ({t.tensor_type.name}): {e}") from None
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            if array.shape[0] % (2 * heads):  # rows are pairs per head; anything else cannot be unpermuted
                raise CheckpointError(f"GGUF tensor {t.name!r} has shape {array.shape}, whose rows do not split "
                                      f"into {heads} heads of rotary pairs")
            array = unpermute_rows(array, heads)
        if config["model_type"] == "gemma3_text" and "norm.weight" in t.name:
            array = array - 1  # llama.cpp stores Gemma's norms as 1 + weight; transformers' loader subtracts it too
        state[name] = torch.tensor(array, dtype=torch.float32)  # a copy: the reader's arrays are read-only
    return state


def tensor_shapes(reader) -> dict:
    """Each tensor's name and shape (transformers' order), from the file's tensor index."""
    return {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}


def checkpoint_shapes(path, config: dict) -> dict:
    """Each tensor's shape under transformers' names (what `weight_shapes` reads from safetensors
    headers), from the GGUF file's tensor index: nothing is read or dequantised."""
    return {hf_name(name, config["model_type"]): shape for name, shape in tensor_shapes(open_gguf(Path(path))).items()}


def read_gguf_config(path) -> dict:
    """The config.json dict of a GGUF file, from its metadata alone (no tensor is read)."""
    reader = open_gguf(Path(path))
    return hf_config(metadata(reader), tensor_shapes(reader), f"GGUF file {path}")


def convert_gguf(path, cache_dir: Path | None = None, check_config=None, weights: bool = True) -> Path:
    """Convert a GGUF file to a checkpoint directory (cached by file identity); return the directory.

    `check_config(config, source)` is the architecture's own config check (the loader passes it),
    run before anything is dequantised or written. `weights=False` writes config.json and the
    tokenizer files only (a later call with `weights=True` adds model.safetensors)."""
    from kernelhub.checkpoint.gguf_tokenizer import tokenizer_files

    path = Path(path)
    stat = path.stat() if path.is_file() else None
    if stat is None:
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = (cache_dir or cache_root() / "gguf") / f"{path.stem}-{key}"
    if (out / "model.safetensors").is_file() or (not weights and (out / "tokenizer_config.json").is_file()):
        return out
    reader = open_gguf(path)
    meta = metadata(reader)
    config = hf_config(meta, tensor_shapes(reader), f"GGUF file {path}")
    # The model's own checks too (an odd head_dim, say), before anything is dequantised or written.
    if check_config is not None:
        check_config(config, f"config derived from GGUF file {path}")
    tokenizer_json, tokenizer_config = tokenizer_files(meta)
    rows = checkpoint_shapes(path, config).get("model.embed_tokens.weight", (config["vocab_size"],))[0]
    if rows != config["vocab_size"]:
        raise CheckpointError(f"{path}: embedding has {rows} rows but the vocabulary has "
                              f"{config['vocab_size']} tokens")
    whole = (out / "tokenizer_config.json").is_file()  # written last into a directory renamed whole
    if not whole:
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)  # a half-written directory from an interrupted run
        try:
            os.replace(tmp, out)
        except OSError:  # another process put a whole one there first
            shutil.rmtree(tmp, ignore_errors=True)
    if weights:  # beside the config and tokenizer, which readers may be using: one file, renamed in place
        from safetensors.torch import save_file

        part = out / f"model.safetensors.tmp{os.getpid()}"
        save_file(read_tensors(reader, config), str(part), metadata={"format": "pt", "source": path.name})
        os.replace(part, out / "model.safetensors")
    return out
