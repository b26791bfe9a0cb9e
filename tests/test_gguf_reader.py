"""Our GGUF reader gives exactly what gguf-py's reference `GGUFReader` gives, and names what is wrong
with a damaged file."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape

from kernelhub.checkpoint.gguf_reader import GgufFile

QUANTISED = [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_0,
             GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q6_K]


def write_every_kind(path):
    """Every metadata value type (scalars, strings, arrays of each) and tensors of plain and block types."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ▁world")
    w.add_array("t.strings", ["", "a", "ü" * 40, "<|endoftext|>"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, -1.25])
    w.add_key_value("t.u64s", [1, 2**40], GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT64)
    w.add_array("t.empty", [])
    w.add_tensor("plain.f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("plain.f16", rng.standard_normal((2, 7)).astype(np.float16))
    w.add_tensor("plain.i32", np.arange(6, dtype=np.int32))
    for qtype in QUANTISED:  # the reader moves bytes, so any bytes will do
        blocks = rng.integers(0, 256, quant_shape_to_byte_shape((4, 512), qtype), dtype=np.uint8)
        w.add_tensor(f"blocks.{qtype.name}", blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def every_kind(tmp_path_factory):
    return write_every_kind(tmp_path_factory.mktemp("gguf") / "every.gguf")


def test_metadata_and_tensors_equal_the_reference_reader(every_kind):
    ours, reference = GgufFile(every_kind), GGUFReader(every_kind)
    keys = [k for k in reference.fields if not k.startswith("GGUF.")]
    assert [k for k in ours.fields if not k.startswith("GGUF.")] == keys
    for key in keys:
        assert ours.fields[key].contents() == reference.fields[key].contents(), key
    assert ours.fields["t.strings"].contents() == ["", "a", "ü" * 40, "<|endoftext|>"]
    assert ours.fields["t.u64"].contents() == 2**63 + 5
    assert len(ours.tensors) == len(reference.tensors) == 3 + len(QUANTISED)
    for a, b in zip(ours.tensors, reference.tensors):
        assert (a.name, a.tensor_type, list(a.shape), a.n_elements, a.n_bytes, a.data_offset) == (
            b.name, b.tensor_type, list(b.shape), b.n_elements, b.n_bytes, b.data_offset)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"GGUX" + data[4:], "magic"),
    (lambda data: data[:4] + (9).to_bytes(4, "little") + data[8:], "version 9 is not supported"),
    (lambda data: data[:200], "ends inside its header.*truncated"),
    (lambda data: data[:-100], r"'blocks\.Q6_K' needs bytes .*truncated"),
])
def test_a_damaged_file_is_a_value_error_saying_what_is_wrong(every_kind, tmp_path, damage, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(every_kind.read_bytes()))
    with pytest.raises(ValueError, match=message):
        GgufFile(bad)


def test_an_unknown_ggml_type_names_its_tensor(every_kind, tmp_path):
    data = bytearray(every_kind.read_bytes())
    name = b"plain.i32"
    at = data.index(name) + len(name)
    dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * dims
    data[type_at:type_at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"tensor 'plain\.i32' has ggml type 99, which is no known ggml type"):
        GgufFile(bad)
