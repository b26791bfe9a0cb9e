"""ggml's quantised blocks in plain torch: sizes, checks, and unpacking to float32.

A GGUF checkpoint stores a quantised matrix as raw blocks: a uint8 tensor `[out_features,
bytes_per_row]` plus its ggml type. This module knows the block layout of the types kernelhub
serves packed (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and unpacks them with torch ops
alone (`torch_dequantize`), giving gguf-py's float32 values bit for bit on any device. It is the
model-side half: the declared `QuantizedLinear` layer's reference forward uses it, and the packed
kernels (`kernelhub.backends.gguf_quant`) re-export it.

>>> block_shape(8)                          # Q8_0: 32 values in 34 bytes
(32, 34)
>>> row_bytes(8, 64)
68
"""

from __future__ import annotations

import torch

from kernelhub.declare.errors import BindError, CheckpointError

# ggml type id -> (name, values per block, bytes per block), as ggml.h and gguf-py's GGML_QUANT_SIZES
BLOCKS = {2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
          8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}
SERVED_TYPES = frozenset(BLOCKS)
# where each type's fp16 scale (and minimum) fields sit in a block: what a valid random block needs
SCALE_BYTES = {t: (208, 210) if t == 14 else (0, 4 if BLOCKS[t][0] in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else 2)
               for t in BLOCKS}


def type_name(ggml_type: int) -> str:
    """The ggml type's name ("Q4_1"); the gguf package's name for a type not served; else "unknown"."""
    if ggml_type in BLOCKS:
        return BLOCKS[ggml_type][0]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return "unknown"


def block_shape(ggml_type: int) -> tuple[int, int]:
    """(values per block, bytes per block) of a served type; BindError naming the served ones else."""
    entry = BLOCKS.get(ggml_type)
    if entry is None:
        served = ", ".join(f"{name} ({t})" for t, (name, _, _) in BLOCKS.items())
        raise BindError(f"ggml type {ggml_type} ({type_name(ggml_type)}) is not served by kernelhub's GGUF "
                        f"kernel; it serves {served}. Load the checkpoint with dequantize=True for float weights.")
    return entry[1], entry[2]


def row_bytes(ggml_type: int, in_features: int) -> int:
    """Bytes a packed row of `in_features` values takes, checking they are whole blocks."""
    values, size = block_shape(ggml_type)
    if in_features <= 0 or in_features % values:
        raise CheckpointError(f"in_features {in_features} is not a whole number of {type_name(ggml_type)} blocks "
                              f"({values} values each); a {type_name(ggml_type)} row holds a multiple of {values}")
    return in_features // values * size


def random_blocks(ggml_type: int, rows: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Seeded valid `[rows, row_bytes]` blocks: random bytes whose fp16 scale fields hold finite values
    of both signs (between 1e-3 and 2e-2 in size), so every value unpacks to a finite float."""
    gen = torch.Generator().manual_seed(seed)
    values, size = block_shape(ggml_type)
    n = in_features // values
    raw = torch.randint(0, 256, (rows, n, size), generator=gen, dtype=torch.uint8)
    start, stop = SCALE_BYTES[ggml_type]
    count = (stop - start) // 2
    signs = torch.randint(0, 2, (rows, n, count), generator=gen) * 2 - 1
    scales = (torch.rand(rows, n, count, generator=gen) * 1.9e-2 + 1e-3) * signs
    raw[..., start:stop] = scales.to(torch.float16).view(torch.uint8)
    return raw.reshape(rows, n * size)


def _half(b: torch.Tensor, at: int) -> torch.Tensor:
    return b[:, at:at + 2].contiguous().view(torch.float16).float()  # [blocks, 1]


def _nibbles(b: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n]: the low nibbles, then the high ones."""
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def _bits(b: torch.Tensor, width: int = 1) -> torch.Tensor:
    """[..., n] bytes -> [..., 8 // width, n]: field j (`width` bits from bit j * width) of byte l at [j, l]."""
    shift = torch.arange(0, 8, width, dtype=torch.uint8, device=b.device)
    return (b.unsqueeze(-2) >> shift.view(-1, 1)) & ((1 << width) - 1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 32-bit qh -> bit i of it at [:, i], shifted to bit 4."""
    return _bits(qh).transpose(-1, -2).reshape(qh.shape[0], 32) << 4


def _k_scales(b: torch.Tensor):
    """The 8 six-bit scales and minimums of Q4_K/Q5_K as `d * scale`, `dmin * min`: [blocks, 8, 1]."""
    s = b[:, 4:16]
    scale = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 2) & 0x30)], dim=1)
    minimum = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 2) & 0x30)], dim=1)
    return (_half(b, 0) * scale.float()).unsqueeze(-1), (_half(b, 2) * minimum.float()).unsqueeze(-1)


def _q4_0(b):
    return _half(b, 0) * (_nibbles(b[:, 2:18]).to(torch.int8) - 8).float()


def _q4_1(b):
    return _half(b, 0) * _nibbles(b[:, 4:20]).float() + _half(b, 2)


def _q5_0(b):
    return _half(b, 0) * ((_nibbles(b[:, 6:22]) | _fifth_bits(b[:, 2:6])).to(torch.int8) - 16).float()


def _q5_1(b):
    return _half(b, 0) * (_nibbles(b[:, 8:24]) | _fifth_bits(b[:, 4:8])).float() + _half(b, 2)


def _q8_0(b):
    return _half(b, 0) * b[:, 2:34].view(torch.int8).float()


def _q4_k(b):
    scale, minimum = _k_scales(b)
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)  # sub-blocks 2c, 2c+1 from bytes 32c..
    return (scale * q.float() - minimum).reshape(-1, 256)


def _q5_k(b):
    scale, minimum = _k_scales(b)
    q = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32) | (_bits(b[:, 16:48]) << 4)
    return (scale * q.float() - minimum).reshape(-1, 256)


def _q6_k(b):
    # each half of 128 values: low nibbles of ql[0:32], ql[32:64], then their high nibbles; bits 4-5
    # from the 2-bit fields of qh[0:32] in turn
    low = _nibbles(b[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = _bits(b[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(-1, 16, 16)
    scale = _half(b, 208) * b[:, 192:208].view(torch.int8).float()
    return (scale.unsqueeze(-1) * q).reshape(-1, 256)


_REFERENCE = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k}


def torch_dequantize(blocks: torch.Tensor, ggml_type: int, shape) -> torch.Tensor:
    """The float32 values of packed `blocks` (uint8, any shape holding whole blocks), as `shape`: what
    `gguf.quants.dequantize` computes, in torch ops, vectorised over blocks, on any device."""
    values, size = block_shape(ggml_type)
    flat = blocks.reshape(-1)
    if flat.dtype != torch.uint8 or flat.numel() % size:
        raise CheckpointError(f"{flat.numel()} {flat.dtype} elements are not whole {type_name(ggml_type)} blocks "
                              f"of {size} bytes")
    return _REFERENCE[int(ggml_type)](flat.view(-1, size)).reshape(shape)
