"""ggml's quantised blocks unpacked with torch ops alone (float32, gguf-py's values bit for bit).

A quantised matrix is a uint8 tensor `[rows, bytes_per_row]` of ggml blocks. Served types (ggml id:
name, values per block, bytes per block): 2 Q4_0, 3 Q4_1, 6 Q5_0, 7 Q5_1, 8 Q8_0 (32 values), 12 Q4_K,
13 Q5_K, 14 Q6_K (256 values). Everything is vectorised over blocks and runs on any torch device.
"""

import torch

BLOCKS = {2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
          8: ("Q8_0", 32, 34), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210)}


def block_shape(ggml_type: int) -> tuple:
    """(values per block, bytes per block); ValueError naming the served types for any other type."""
    entry = BLOCKS.get(int(ggml_type))
    if entry is None:
        served = ", ".join(f"{name} ({t})" for t, (name, _, _) in BLOCKS.items())
        raise ValueError(f"ggml type {ggml_type} is not served by this kernel; it serves {served}")
    return entry[1], entry[2]


def row_bytes(ggml_type: int, cols: int) -> int:
    """Bytes of one packed row of `cols` values; ValueError unless `cols` is whole blocks."""
    values, size = block_shape(ggml_type)
    if cols <= 0 or cols % values:
        raise ValueError(f"{cols} values are not a whole number of {BLOCKS[int(ggml_type)][0]} blocks of {values}")
    return cols // values * size


def _half(b, at):
    return b[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(b):
    return torch.cat([b & 0x0F, b >> 4], dim=-1)


def _bits(b, width=1):
    shift = torch.arange(0, 8, width, dtype=torch.uint8, device=b.device)
    return (b.unsqueeze(-2) >> shift.view(-1, 1)) & ((1 << width) - 1)


def _fifth_bits(qh):
    return _bits(qh).transpose(-1, -2).reshape(qh.shape[0], 32) << 4


def _k_scales(b):
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
    q = _nibbles(b[:, 16:144].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    return (scale * q.float() - minimum).reshape(-1, 256)


def _q5_k(b):
    scale, minimum = _k_scales(b)
    q = _nibbles(b[:, 48:176].reshape(-1, 4, 32)).reshape(-1, 8, 32) | (_bits(b[:, 16:48]) << 4)
    return (scale * q.float() - minimum).reshape(-1, 256)


def _q6_k(b):
    low = _nibbles(b[:, :128].reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = _bits(b[:, 128:192].reshape(-1, 2, 32), 2).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(-1, 16, 16)
    scale = _half(b, 208) * b[:, 192:208].view(torch.int8).float()
    return (scale.unsqueeze(-1) * q).reshape(-1, 256)


_UNPACK = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k}


def unpack(weight: torch.Tensor, ggml_type: int, cols: int) -> torch.Tensor:
    """Float32 `[rows, cols]` from packed `weight` `[rows, row_bytes(ggml_type, cols)]` (uint8)."""
    expected = row_bytes(ggml_type, cols)
    if weight.dtype != torch.uint8 or weight.dim() != 2 or weight.shape[1] != expected:
        raise ValueError(f"a packed {BLOCKS[int(ggml_type)][0]} weight of {cols} columns is uint8 "
                         f"[rows, {expected}]; got {weight.dtype} of shape {tuple(weight.shape)}")
    size = block_shape(ggml_type)[1]
    return _UNPACK[int(ggml_type)](weight.contiguous().view(-1, size)).reshape(weight.shape[0], cols)
