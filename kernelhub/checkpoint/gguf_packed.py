"""GGUF checkpoints with their quantised Linear weights kept packed (`dequantize=False`).

`from_pretrained(path_to_gguf, dequantize=False)` keeps each 2-D projection weight (q/k/v/o,
gate/up/down, and lm_head when it is not tied to the embedding) of a served ggml type (Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) as the file stores it: uint8 rows of ggml blocks, in a declared
`QuantizedLinear` layer that replaces the model's `Linear`. Everything else (embeddings, norms,
weights of other types such as F16, F32 or Q2_K) is dequantised as `dequantize=True` does.

Packed rows are independent, so row operations work on them as on float rows: llama.cpp's q/k
row permutation is undone on the packed rows, and a fused projection (`FUSED`: q/k/v into
`qkv_proj`, gate/up into `gate_up_proj`) concatenates its parts' rows when they share one ggml
type; parts of different types are dequantised instead, and the plan says so.
"""

from __future__ import annotations

import numpy as np
import torch

from kernelhub.checkpoint.gguf import hf_name, open_gguf
from kernelhub.checkpoint.hf_layout import from_checkpoint, materialize, ties, to_checkpoint, weight_files
from kernelhub.declare.errors import BindError, CheckpointError
from kernelhub.declare.ggml_blocks import SERVED_TYPES, row_bytes, type_name
from kernelhub.declare.layer import layer_name
from kernelhub.declare.reference_layers import QuantizedLinear

PROJECTIONS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
               "up_proj.weight", "down_proj.weight")
DEFAULT_KERNELS = ["gguf", "reference"]


def pack_tensor(name: str, data, ggml_type: int, shape: tuple[int, int]) -> torch.Tensor:
    """The raw bytes `data` of GGUF tensor `name` (`shape` = (out_features, in_features)) as a uint8
    `[out_features, bytes_per_row]` tensor of its own; CheckpointError naming the tensor when the type
    is not served or the bytes are not whole rows of blocks.

    >>> pack_tensor("blk.0.attn_q.weight", np.zeros(67, np.uint8), 8, (2, 64))
    Traceback (most recent call last):
        ...
    kernelhub.declare.errors.CheckpointError: GGUF tensor 'blk.0.attn_q.weight' (Q8_0, shape (2, 64)) holds 67 ...
    """
    rows, cols = shape
    try:
        per_row = row_bytes(int(ggml_type), cols)
    except (BindError, CheckpointError) as e:
        raise CheckpointError(f"GGUF tensor {name!r} cannot be kept packed: {e}") from None
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if raw.size != rows * per_row:
        raise CheckpointError(f"GGUF tensor {name!r} ({type_name(int(ggml_type))}, shape {tuple(shape)}) holds "
                              f"{raw.size} bytes; {rows} rows of {per_row} bytes need {rows * per_row} "
                              "(truncated file?)")
    return torch.tensor(raw.reshape(rows, per_row))  # a copy: the reader's arrays map the file read-only


def unpermute_packed(blocks: torch.Tensor, heads: int, name: str) -> torch.Tensor:
    """llama.cpp's q/k rotary row order undone on packed rows (as `unpermute_rows` does on float rows)."""
    rows = blocks.shape[0]
    if rows % (2 * heads):
        raise CheckpointError(f"GGUF tensor {name!r} has {rows} rows, which do not split into {heads} heads of "
                              "rotary pairs")
    return blocks.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1).contiguous()


def packed_weights(path, config: dict) -> dict:
    """{checkpoint name: (blocks, ggml type)} of the file's projection weights of served types."""
    reader = open_gguf(path)
    out = {}
    for t in reader.tensors:
        name = hf_name(t.name, config["model_type"])
        served = int(t.tensor_type) in SERVED_TYPES and len(t.shape) == 2
        if not served or not (name.endswith(PROJECTIONS) or name == "lm_head.weight"):
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        blocks = pack_tensor(t.name, t.data, int(t.tensor_type), shape)
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            blocks = unpermute_packed(blocks, heads, t.name)
        out[name] = (blocks, int(t.tensor_type), shape[1])
    return out


def _fuse(model, packed: dict) -> tuple[dict, list[str]]:
    """`packed` in the model's names: fused parts concatenated where they share one type (else left
    to be dequantised, with a note saying so)."""
    packed, notes = dict(packed), []
    for fused, parts in getattr(model, "FUSED", {}).items():
        for key in [k for k in packed if f".{parts[0]}." in k]:
            names = [key.replace(parts[0], p) for p in parts]
            found = [packed.pop(n) for n in names if n in packed]
            types = {f[1] for f in found}
            if len(found) == len(parts) and len(types) == 1:
                packed[key.replace(parts[0], fused)] = (torch.cat([f[0] for f in found]), types.pop(), found[0][2])
            else:
                kinds = ", ".join(type_name(t) for t in sorted(types)) or "none"
                notes.append(f"{key.replace(parts[0], fused)} dequantised: its parts {', '.join(parts)} are not one "
                             f"served ggml type (theirs: {kinds})")
    return packed, notes


def pack_model(model, path, config: dict) -> tuple[dict, list[str]]:
    """Replace `model`'s (meta) Linear modules whose weights the GGUF file at `path` keeps packed by
    `QuantizedLinear` modules; return ({module path: blocks}, notes for the plan)."""
    packed, notes = _fuse(model, packed_weights(path, config))
    tied = {alias for alias, _ in ties(model)}
    placed = {}
    for name, (blocks, ggml_type, cols) in packed.items():
        path_, _, leaf = name.rpartition(".")
        module = model.get_submodule(path_) if leaf == "weight" and name not in tied else None
        if module is None or layer_name(module) != "Linear" or (module.out_features, module.in_features) != (
                blocks.shape[0], cols):
            notes.append(f"{name} dequantised: no Linear of its shape to hold it packed")
            continue
        with torch.device("meta"):
            quantized = QuantizedLinear(module.in_features, module.out_features, ggml_type,
                                        bias=module.bias is not None)
        owner, _, attr = path_.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, quantized)
        placed[path_] = blocks
    return placed, notes


def with_packed_kernels(kernels, asked):
    """`kernels` with QuantizedLinear layers defaulting to the packed `gguf` kernel (the reference
    where it cannot serve), unless the caller's own `kernels=` names QuantizedLinear."""
    if isinstance(asked, dict) and "QuantizedLinear" in asked:
        return kernels
    if kernels is None:
        return {"QuantizedLinear": list(DEFAULT_KERNELS)}
    if isinstance(kernels, dict) and "QuantizedLinear" not in kernels:
        return {**kernels, "QuantizedLinear": list(DEFAULT_KERNELS)}
    return kernels


def load_packed(model, directory, placed: dict, *, dtype, device, source: str):
    """Materialise `model`: packed blocks into its QuantizedLinear modules, every other tensor from the
    dequantised checkpoint `directory` (only the tensors the model still needs are read)."""
    from safetensors import safe_open

    tied = {alias for alias, _ in ties(model)}
    ours = {k: v for k, v in model.state_dict().items() if k not in tied and not k.endswith(".qweight")}
    expected = to_checkpoint(model, ours)
    state = {}
    for file in weight_files(directory):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in expected:
                    state[name] = f.get_tensor(name)
    missing = [n for n in expected if n not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s) the model needs: {', '.join(missing[:8])}")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                  f"the model expects {tuple(want.shape)}")
    state = from_checkpoint(model, state)
    for path_, blocks in placed.items():
        state[f"{path_}.qweight"] = blocks
    return materialize(model, state, dtype=dtype, device=device)
