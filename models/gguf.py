"""GGUF checkpoints: dequantised weights, config and tokenizer, converted once and cached.

`convert_gguf(path)` reads a GGUF file with the `gguf` package, dequantises every tensor to
float32, maps llama.cpp tensor names to transformers' names (undoing llama.cpp's q/k row
permutation for rotary embeddings), derives `config.json` from the metadata, and builds a
`tokenizer.json` from the vocabulary and merges. The result is an ordinary checkpoint
directory in the user cache, so the second load reads safetensors and starts fast.
No transformers at run time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from kernelhub.registry.errors import CheckpointError

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
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


def cache_root() -> Path:
    """Where converted checkpoints live: $KERNELHUB_CACHE, else the user cache directory."""
    base = os.environ.get("KERNELHUB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kernelhub")
    return Path(base)


def open_gguf(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on damaged files
        raise CheckpointError(f"cannot read GGUF file {path}: {type(e).__name__}: {e} "
                              "(truncated download or not a GGUF file?)") from None


def metadata(reader) -> dict:
    """The file's key/value metadata as plain Python values."""
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as e:
            raise CheckpointError(f"GGUF metadata field {key!r} is unreadable: {e}") from None
    return out


def hf_config(meta: dict, tensor_names: set) -> dict:
    """A transformers-style config.json dict from llama.cpp metadata."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def need(key):
        if f"{arch}.{key}" not in meta:
            raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
        return meta[f"{arch}.{key}"]

    heads = need("attention.head_count")
    hidden = need("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return {
        "model_type": arch,
        "vocab_size": meta.get(f"{arch}.vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{arch}.rope.dimension_count", hidden // heads),
        "max_position_embeddings": meta.get(f"{arch}.context_length", 2048),
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "dtype": "float32",
    }


def hf_name(name: str) -> str:
    if name in TENSOR_NAMES:
        return TENSOR_NAMES[name]
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise CheckpointError(f"GGUF tensor {name!r} has no counterpart in the model")


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (its rotary layout) back to transformers'."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader, config: dict) -> dict:
    """All tensors, dequantised to float32, under transformers' names."""
    from gguf.quants import dequantize

    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety
        def tqdm(it, **kw):
            return it

    state = {}
    for t in tqdm(reader.tensors, desc="dequantising GGUF", unit="tensor", leave=False):
        name = hf_name(t.name)
        try:
            array = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"cannot dequantise GGUF tensor {t.name!r} ({t.tensor_type.name}): {e}") from None
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            array = unpermute_rows(array, heads)
        state[name] = torch.tensor(array, dtype=torch.float32)  # a copy: the reader's arrays are read-only
    return state


def read_gguf_config(path) -> dict:
    """The config.json dict of a GGUF file, from its metadata alone (no tensor is read)."""
    reader = open_gguf(Path(path))
    return hf_config(metadata(reader), {t.name for t in reader.tensors})


def convert_gguf(path, cache_dir: Path | None = None) -> Path:
    """Convert a GGUF file to a checkpoint directory (cached by file identity); return the directory."""
    from kernelhub.models.gguf_tokenizer import tokenizer_files

    path = Path(path)
    stat = path.stat() if path.is_file() else None
    if stat is None:
        raise CheckpointError(f"GGUF file {str(path)!r} does not exist")
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = (cache_dir or cache_root() / "gguf") / f"{path.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    reader = open_gguf(path)
    meta = metadata(reader)
    config = hf_config(meta, {t.name for t in reader.tensors})
    tokenizer_json, tokenizer_config = tokenizer_files(meta)
    state = read_tensors(reader, config)
    embed = state["model.embed_tokens.weight"]
    if embed.shape[0] != config["vocab_size"]:
        raise CheckpointError(f"{path}: embedding has {embed.shape[0]} rows but the vocabulary has "
                              f"{config['vocab_size']} tokens")
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (tmp / "tokenizer.json").write_text(tokenizer_json)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": path.name})
    shutil.rmtree(out, ignore_errors=True)  # a half-written directory from an interrupted run
    os.replace(tmp, out)
    return out
