"""A fast GGUF reader: metadata and the tensor index in one pass, tensors as memory-mapped views.

gguf-py's `GGUFReader` (the format's reference reader) builds a numpy view per value, which takes
about 25 s for the 262,144-token vocabulary of Gemma 3 (three arrays of that length) before a
single weight is read. This reader decodes the same fields with `struct` in about a second and
answers with the same shapes: `fields[key].contents()` gives the Python value, and `tensors`
holds `gguf.ReaderTensor`s whose `data` is the reference reader's memory-mapped view (uint8 rows
of blocks for quantised types), so `gguf.quants.dequantize` reads them unchanged.
tests/test_gguf_reader.py checks that both readers agree on real files.

>>> reader = GgufFile("SmolLM2-135M-Instruct-Q4_1.gguf")                  # doctest: +SKIP
>>> reader.fields["general.architecture"].contents()                      # doctest: +SKIP
'llama'
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
# value type -> struct format (little endian) for the scalar types
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
         7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
# element types whose tensors are plain arrays (every other type is packed blocks, read as uint8)
PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


class Value:
    """One metadata value, answering `contents()` as gguf-py's `ReaderField` does."""

    __slots__ = ("value", "type")

    def __init__(self, value, value_type: int):
        self.value, self.type = value, value_type

    def contents(self):
        return self.value


class GgufFile:
    """The metadata (`fields`) and tensor index (`tensors`) of a GGUF file; ValueError on a damaged one."""

    def __init__(self, path: str | Path):
        self.data = np.memmap(path, mode="r")
        self._buf = memoryview(self.data)
        try:
            self._read()
        except struct.error:
            raise ValueError(f"the file ends inside its header, at byte {len(self._buf)} (truncated?)") from None

    def _read(self) -> None:
        if bytes(self._buf[:4]) != MAGIC:
            raise ValueError("GGUF magic invalid")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", self._buf, 4)
        if version not in VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (supported: {', '.join(map(str, VERSIONS))})")
        self._at = 24
        self.fields: dict[str, Value] = {"GGUF.version": Value(version, 4)}
        for _ in range(kv_count):
            key = self._string()
            value_type = self._scalar("<I")
            self.fields[key] = Value(self._value(value_type), value_type)
        index = [self._tensor_info() for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment")
        align = DEFAULT_ALIGNMENT if alignment is None else alignment.value
        if alignment is not None and (alignment.type != 4 or align == 0 or align & (align - 1)):
            raise ValueError(f"general.alignment is {align!r}: it must be a uint32 power of two")
        start = -(-self._at // align) * align
        self.tensors = self._tensors(index, start)

    def _scalar(self, fmt: str):
        value = struct.unpack_from(fmt, self._buf, self._at)[0]
        self._at += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        size = self._scalar("<Q")
        end = self._at + size
        if end > len(self._buf):
            raise ValueError(f"a string of {size} bytes at offset {self._at} runs past the end of the file")
        text = str(self._buf[self._at:end], "utf-8")
        self._at = end
        return text

    def _value(self, value_type: int):
        if value_type == STRING:
            return self._string()
        if value_type in SCALARS:
            return self._scalar(SCALARS[value_type])
        if value_type != ARRAY:
            raise ValueError(f"unknown GGUF value type {value_type} at offset {self._at}")
        item_type, count = struct.unpack_from("<IQ", self._buf, self._at)
        self._at += 12
        if item_type in NUMPY:  # one bulk read instead of a view per element
            array = np.frombuffer(self._buf, NUMPY[item_type], count, self._at)
            self._at += array.nbytes
            return array.tolist()
        return [self._value(item_type) for _ in range(count)]

    def _tensor_info(self) -> tuple:
        name = self._string()
        dims = struct.unpack_from(f"<{self._scalar('<I')}Q", self._buf, self._at)
        self._at += 8 * len(dims)
        ggml_type, offset = struct.unpack_from("<IQ", self._buf, self._at)
        self._at += 12
        return name, dims, ggml_type, offset

    def _tensors(self, index: list, start: int) -> list:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
        from gguf.quants import quant_shape_to_byte_shape

        tensors, seen = [], set()
        for name, dims, raw_type, offset in index:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice in the tensor index")
            seen.add(name)
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise ValueError(f"tensor {name!r} has ggml type {raw_type}, which is no known ggml type") from None
            block, size = GGML_QUANT_SIZES[ggml_type]
            elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
            n_bytes = elements * size // block
            at = start + offset
            if at + n_bytes > len(self._buf):
                raise ValueError(f"tensor {name!r} needs bytes {at}..{at + n_bytes} but the file has "
                                 f"{len(self._buf)} (truncated?)")
            shape = tuple(reversed(dims))
            if raw_type in PLAIN:
                data = np.frombuffer(self._buf, PLAIN[raw_type], elements, at).reshape(shape)
            else:
                data = np.frombuffer(self._buf, np.uint8, n_bytes, at).reshape(
                    quant_shape_to_byte_shape(shape, ggml_type))
            tensors.append(ReaderTensor(name=name, tensor_type=ggml_type, shape=np.array(dims, np.uint64),
                                        n_elements=elements, n_bytes=n_bytes, data_offset=at, data=data,
                                        field=None))
        return tensors
