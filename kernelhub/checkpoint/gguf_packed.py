"""GGUF checkpoints with their quantised weights kept packed (the default where a kernel serves them).

`from_pretrained(path_to_gguf)` keeps each 2-D projection weight (q/k/v/o, gate/up/down, lm_head)
and the token embedding of a served ggml type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) as
the file stores it: uint8 rows of ggml blocks, in declared `QuantizedLinear` and `QuantizedEmbedding`
layers that replace the model's `Linear` and `Embedding`. An output projection tied to the embedding
(SmolLM2, Gemma) becomes a `QuantizedLinear` over the same blocks: the table is held once. The model
file needs to know nothing of it. Everything else (norms, weights of other types such as F16, F32 or
Q2_K) is dequantised as `dequantize=True` does, and the plan says which and why.

Packed rows are independent, so row operations work on them as on float rows: llama.cpp's q/k
row permutation is undone on the packed rows, and a fused projection (`FUSED`: q/k/v into
`qkv_proj`, gate/up into `gate_up_proj`) concatenates its parts' rows when they share one ggml
type; parts of different types are dequantised instead, and the plan says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kernelhub.checkpoint.gguf import hf_name, open_gguf, read_tensors
from kernelhub.checkpoint.hf_layout import from_checkpoint, materialize, ties, to_checkpoint
from kernelhub.checkpoint.huge_pages import in_huge_pages
from kernelhub.declare.errors import BindError, CheckpointError
from kernelhub.declare.ggml_blocks import SERVED_TYPES, row_bytes, type_name
from kernelhub.declare.layer import layer_name
from kernelhub.declare.reference_layers import QuantizedEmbedding, QuantizedLinear

PROJECTIONS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
               "up_proj.weight", "down_proj.weight")
EMBEDDING = "model.embed_tokens.weight"
DEFAULT_KERNELS = ["gguf", "reference"]
PACKED_LAYERS = ("QuantizedLinear", "QuantizedEmbedding")


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


def packed_weights(path, config: dict, *, read: bool = True) -> tuple[dict, list[str]]:
    """({checkpoint name: (blocks, ggml type, in_features)} of the file's projection and token embedding
    weights of served types, notes naming those of other types). `read=False` reads the tensor index
    only: the blocks are meta tensors of the right shape (what `explain` needs)."""
    reader = open_gguf(path)
    out, notes = {}, []
    for t in reader.tensors:
        name = hf_name(t.name, config["model_type"])
        if not (name.endswith(PROJECTIONS) or name in (EMBEDDING, "lm_head.weight")) or len(t.shape) != 2:
            continue
        if int(t.tensor_type) not in SERVED_TYPES:
            notes.append(f"{name.removesuffix('.weight')} dequantised: its ggml type "
                         f"{type_name(int(t.tensor_type))} has no packed kernel")
            continue
        shape = tuple(int(d) for d in reversed(t.shape))
        if read:
            blocks = pack_tensor(t.name, t.data, int(t.tensor_type), shape)
        else:
            blocks = torch.empty(shape[0], row_bytes(int(t.tensor_type), shape[1]), dtype=torch.uint8, device="meta")
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            blocks = unpermute_packed(blocks, heads, t.name)
        out[name] = (blocks, int(t.tensor_type), shape[1])
    return out, notes


def _fuse(model, packed: dict) -> tuple[dict, list[str]]:
    """`packed` in the model's names: fused parts concatenated where they share one type; parts of
    different served types kept apart (a tuple of blocks and a tuple of types, for `PackedParts`);
    else left to be dequantised, with a note saying so."""
    packed, notes = dict(packed), []
    for fused, parts in getattr(model, "FUSED", {}).items():
        for key in [k for k in packed if f".{parts[0]}." in k]:
            names = [key.replace(parts[0], p) for p in parts]
            found = [packed.pop(n) for n in names if n in packed]
            types = {f[1] for f in found}
            if len(found) == len(parts) and len(types) == 1:
                packed[key.replace(parts[0], fused)] = (torch.cat([f[0] for f in found]), types.pop(), found[0][2])
            elif len(found) == len(parts) and len({f[2] for f in found}) == 1:
                packed[key.replace(parts[0], fused)] = (tuple(f[0] for f in found), tuple(f[1] for f in found),
                                                        found[0][2])
            else:
                kinds = ", ".join(type_name(t) for t in sorted(types)) or "none"
                notes.append(f"{key.replace(parts[0], fused).removesuffix('.weight')} dequantised: its parts "
                             f"{', '.join(parts)} are not all of served ggml types (theirs: {kinds})")
    return packed, notes


def pack_model(model, path, config: dict, *, read: bool = True) -> tuple[dict, list[str]]:
    """Replace `model`'s (meta) Linear and Embedding modules whose weights the GGUF file at `path` keeps
    packed by `QuantizedLinear` and `QuantizedEmbedding` modules; an output projection tied to the
    embedding becomes a `QuantizedLinear` sharing the embedding's blocks. Return ({module path:
    blocks}, notes for the plan); `read=False` places meta blocks (see `packed_weights`)."""
    found, notes = packed_weights(path, config, read=read)
    packed, fused_notes = _fuse(model, found)
    notes += fused_notes
    tied = dict(ties(model))  # alias -> canonical, before the modules holding them are replaced
    placed = {}
    for name, (blocks, ggml_type, cols) in packed.items():
        path_, _, leaf = name.rpartition(".")
        module = model.get_submodule(path_) if leaf == "weight" and name not in tied else None
        if isinstance(blocks, tuple):  # a fused projection whose parts have different types
            rows = [b.shape[0] for b in blocks]
            if not _fits(module, "Linear", torch.empty(sum(rows), 0, device="meta"), cols) or module.bias is not None:
                notes.append(f"{path_} dequantised: its parts' ggml types differ "
                             f"({', '.join(type_name(t) for t in ggml_type)}) and it is not a bias-free Linear")
                continue
            with torch.device("meta"):
                quantized = PackedParts([QuantizedLinear(cols, r, t) for r, t in zip(rows, ggml_type)])
            owner, _, attr = path_.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, quantized)
            placed.update({f"{path_}.parts.{i}": b for i, b in enumerate(blocks)})
            continue
        if _fits(module, "Linear", blocks, cols):
            _replace(model, path_, QuantizedLinear, module.in_features, module.out_features, ggml_type,
                     bias=module.bias is not None)
        elif _fits(module, "Embedding", blocks, cols):
            _replace(model, path_, QuantizedEmbedding, module.num_embeddings, module.embedding_dim, ggml_type)
            for alias in [a for a, canonical in tied.items() if canonical == name]:
                owner = model.get_submodule(alias.rpartition(".")[0])
                if not _fits(owner, "Linear", blocks, cols):
                    raise CheckpointError(f"{alias} is tied to {name} but is not a Linear of its shape")
                _replace(model, alias.rpartition(".")[0], QuantizedLinear, cols, blocks.shape[0], ggml_type,
                         bias=owner.bias is not None)  # its own bias, read from the file like any other
                placed[alias.rpartition(".")[0]] = blocks  # the same blocks: held once
        else:
            notes.append(f"{path_} dequantised: no Linear or Embedding of its shape to hold it packed")
            continue
        placed[path_] = blocks
    return placed, notes


class PackedParts(torch.nn.Module):
    """A fused projection (q/k/v, gate/up) whose parts a GGUF file stores in different ggml types: one
    `QuantizedLinear` per part (`parts`, each bound to its kernel and shown in the plan with its type),
    their outputs concatenated in the fused order, as the fused Linear's would be.

    >>> from kernelhub.declare.reference_layers import QuantizedLinear
    >>> fused = PackedParts([QuantizedLinear(32, 4, 8), QuantizedLinear(32, 2, 2)])   # Q8_0 and Q4_0 rows
    >>> tuple(fused(torch.ones(3, 32)).shape), fused.out_features
    ((3, 6), 6)
    """

    def __init__(self, parts):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)

    def forward(self, x):
        return torch.cat([part(x) for part in self.parts], dim=-1)


def _fits(module, kind: str, blocks, cols: int) -> bool:
    if kind == "Linear":
        return (module is not None and layer_name(module) == "Linear"
                and (module.out_features, module.in_features) == (blocks.shape[0], cols))
    return (type(module) is torch.nn.Embedding and module.padding_idx is None and module.max_norm is None
            and (module.num_embeddings, module.embedding_dim) == (blocks.shape[0], cols))


def _replace(model, path_: str, cls, *args, **kwargs) -> None:
    """The module at `path_` replaced by `cls(*args, **kwargs)`, built on the meta device."""
    owner, _, attr = path_.rpartition(".")
    with torch.device("meta"):
        quantized = cls(*args, **kwargs)
    setattr(model.get_submodule(owner) if owner else model, attr, quantized)


def with_packed_kernels(kernels, model=None):
    """`kernels` with the packed layers (QuantizedLinear, QuantizedEmbedding) defaulting to their `gguf`
    kernels (the reference where those cannot serve), unless the caller's own `kernels=` names them.
    With `model`, only the layers it holds get one.

    >>> with_packed_kernels({"RMSNorm": "reference"})["QuantizedEmbedding"]
    ['gguf', 'reference']
    """
    if kernels is not None and not isinstance(kernels, dict):
        return kernels  # bind reports a malformed kernels= itself
    defaults = {layer: list(DEFAULT_KERNELS) for layer in PACKED_LAYERS}
    held = None if model is None else {layer_name(m) for m in model.modules()}
    added = {layer: chain for layer, chain in defaults.items()
             if layer not in (kernels or {}) and (held is None or layer in held)}
    return {**(kernels or {}), **added} if added else kernels


def load_packed(model, gguf_file, placed: dict, config: dict, *, dtype, device, source: str):
    """Materialise `model`: packed blocks into its QuantizedLinear and QuantizedEmbedding modules (on the
    CPU gathered into one buffer of huge pages, `huge_pages.py`; tied ones share one tensor), every
    other tensor (norms, weights of types without a packed kernel) dequantised from the GGUF file
    itself: only the tensors the model still needs are read."""
    tied = {alias for alias, _ in ties(model)}
    ours = {k: v for k, v in model.state_dict().items() if k not in tied and not k.endswith(".qweight")}
    expected = to_checkpoint(model, ours)
    state = read_tensors(open_gguf(Path(gguf_file)), config, names=set(expected))
    missing = [n for n in expected if n not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {len(missing)} weight(s) the model needs: {', '.join(missing[:8])}")
    for name, want in expected.items():
        if tuple(state[name].shape) != tuple(want.shape):
            raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                  f"the model expects {tuple(want.shape)}")
    model = materialize(model, from_checkpoint(model, state), dtype=dtype, device=device)
    unique = list({id(blocks): blocks for blocks in placed.values()}.values())  # a tied pair holds one tensor
    if device is None or torch.device(device).type == "cpu":  # streamed every token: fewer, larger pages
        moved = in_huge_pages(unique)
    else:
        moved = [blocks.to(device) for blocks in unique]
    by_id = {id(old): new for old, new in zip(unique, moved)}
    for path_, blocks in placed.items():
        model.get_submodule(path_).qweight = by_id[id(blocks)]
    return model
