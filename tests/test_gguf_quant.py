"""Products with packed GGUF blocks (`kernelhub.backends.gguf_quant`): the C kernel (each build this
CPU runs: AVX-512 and AVX2) and the torch reference against gguf-py's own dequantisation followed by a
float32 matmul, for every served type, 1 to 16 input rows, float32 and bfloat16; clear errors for
blocks that do not fit; the ops inside a compiled graph; and the same numbers where the C library
cannot be built."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kernelhub.backends import gguf_quant
from kernelhub.backends.gguf_linear import GgufLinear
from kernelhub.backends.gguf_quant import (TYPES, dequantize, get_rows, gguf_kernel_available, mul_mat_eager,
                                           mul_mat_vec, torch_dequantize, unavailable_reason)
from kernelhub.declare.errors import BindError, CheckpointError
from kernelhub.declare.log import captured_logs

needs_kernel = pytest.mark.skipif(not gguf_kernel_available(), reason=f"cannot be built here: {unavailable_reason()}")
QUANTIZABLE = (GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1, GGML.Q8_0)  # gguf-py quantizes these


def blocks(ggml_type, out_features, n_blocks, seed=0) -> np.ndarray:
    """Valid random `[out_features, bytes_per_row]` blocks: gguf-py's quantisation of random data where
    it has one, else random bytes whose fp16 scale fields are set to finite values of both signs."""
    rng = np.random.default_rng(seed)
    values, size = GGML_QUANT_SIZES[ggml_type]
    if ggml_type in QUANTIZABLE:
        return gguf_quantize(rng.standard_normal((out_features, n_blocks * values)).astype(np.float32), ggml_type)
    raw = rng.integers(0, 256, (out_features, n_blocks, size), dtype=np.uint8)
    scales = (rng.uniform(1e-3, 2e-2, (out_features, n_blocks, 2)) * rng.choice([-1, 1], (out_features, n_blocks, 2)))
    scales = scales.astype(np.float16).view(np.uint8)  # [..., 4]: two halves
    if ggml_type == GGML.Q6_K:
        raw[..., 208:210] = scales[..., :2]
    else:  # d, dmin
        raw[..., 0:4] = scales
    return raw.reshape(out_features, n_blocks * size)


def oracle(packed: np.ndarray, ggml_type) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(packed, ggml_type).astype(np.float32))


def assert_close(out, x, weight):
    """float32: within 1e-5 of the largest output of the float32 product of the unpacked weight;
    bfloat16: that product of the bf16 inputs, within one bf16 ulp (plus the same float32 slack)."""
    want = x.float() @ weight.T
    assert out.dtype == x.dtype and out.shape == want.shape
    slack = 1e-5 * want.abs().max()
    if x.dtype == torch.bfloat16:
        ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(1e-30))))
        slack = slack + ulp
    assert ((out.float() - want).abs() <= slack).all(), (out.float() - want).abs().max() / want.abs().max()


@pytest.fixture(params=gguf_quant.instruction_sets())
def build(request, monkeypatch):
    """Each build of the C kernel this CPU runs in turn: AVX-512 and AVX2 where it has AVX-512."""
    if not gguf_kernel_available():
        pytest.skip(f"the C kernel cannot be built here: {unavailable_reason()}")
    monkeypatch.setattr(gguf_quant, "_built", (gguf_quant._build(request.param), ""))
    return request.param


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_both_unpackings_are_gguf_py_s_bit_for_bit(ggml_type, build):
    packed = blocks(ggml_type, 7, 3)
    want = oracle(packed, ggml_type)
    weight = torch.from_numpy(packed)
    k = want.shape[1]
    assert torch.equal(torch_dequantize(weight, int(ggml_type), (7, k)), want)
    assert torch.equal(dequantize(weight, int(ggml_type), 7, k, torch.float32), want)
    assert torch.equal(dequantize(weight, int(ggml_type), 7, k, torch.bfloat16), want.bfloat16())
    ids = torch.tensor([6, 0, 3, 3])
    assert torch.equal(get_rows(weight, ids, int(ggml_type), k, torch.float32), want[ids])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_products_match_unpack_then_matmul(ggml_type, dtype, build):
    """1, 3 and 8 rows run in one pass of the C kernel, 13 and 16 (a short prompt) in passes of 8, 40
    (prefill) tile by tile; odd and even output counts;
    one block and three blocks a row; and rows long enough that 8 input rows are taken a span of
    columns at a time."""
    values = GGML_QUANT_SIZES[ggml_type][0]
    for out_features, n_blocks in [(7, 1), (64, 1), (7, 3), (64, 3), (9, 4096 // values)]:
        packed = blocks(ggml_type, out_features, n_blocks, seed=out_features + n_blocks)
        weight, want = torch.from_numpy(packed), oracle(packed, ggml_type)
        reference = torch_dequantize(weight, int(ggml_type), want.shape)
        for rows in (1, 2, 3, 5, 8, 13, 16, 40):
            x = torch.randn(rows, want.shape[1], generator=torch.Generator().manual_seed(rows)).to(dtype)
            assert_close(mul_mat_vec(weight, x, int(ggml_type), out_features), x, want)
            assert_close((x.float() @ reference.T).to(dtype), x, want)  # the torch reference itself


@needs_kernel
def test_a_bias_is_added_before_the_one_rounding_and_leading_dims_are_kept():
    packed = blocks(GGML.Q4_K, 5, 2)
    weight, want, bias = torch.from_numpy(packed), oracle(packed, GGML.Q4_K), torch.randn(5)
    x = torch.randn(2, 3, 512)
    longer = torch.randn(4, 5, 512)
    # 1, 3 and 6 rows in one pass of the kernel, 20 in three passes, 40 through F.linear tiles
    for rows in (x[:1, :1], x[:1], x, longer, torch.cat([longer, longer])):
        out = mul_mat_eager(weight, rows, int(GGML.Q4_K), 5, bias)
        assert out.shape == (*rows.shape[:-1], 5)
        assert torch.allclose(out, rows @ want.T + bias, rtol=0, atol=1e-5 * out.abs().max())
    out = mul_mat_eager(weight, x[0].bfloat16(), int(GGML.Q4_K), 5, bias)
    exact = x[0].bfloat16().float() @ want.T + bias
    assert torch.equal(out, (mul_mat_eager(weight, x[0].bfloat16().float(), int(GGML.Q4_K), 5, bias)).bfloat16())
    assert ((out.float() - exact).abs() <= exact.abs() * 2**-8 + 1e-5).all()


def test_scales_of_every_kind_unpack_exactly():
    """fp16 scales that are subnormal, negative, tiny and huge read as gguf-py reads them."""
    packed = blocks(GGML.Q8_0, 6, 2)
    for i, d in enumerate([6e-8, -3e-6, 1e-4, -2.0, 65504.0, 0.0]):
        packed[i, 0:2] = np.array([d], np.float16).view(np.uint8)
    want = oracle(packed, GGML.Q8_0)
    assert torch.equal(dequantize(torch.from_numpy(packed), int(GGML.Q8_0), 6, 64, torch.float32), want)
    x = torch.randn(1, 64)
    out = mul_mat_vec(torch.from_numpy(packed), x, int(GGML.Q8_0), 6)
    assert torch.allclose(out, x @ want.T, rtol=0, atol=1e-5 * out.abs().max())


def test_an_unknown_type_names_the_served_ones():
    with pytest.raises(BindError, match=r"ggml type 10 \(Q2_K\) is not served .* Q4_0 \(2\), .* Q6_K \(14\)"):
        mul_mat_vec(torch.zeros(4, 84, dtype=torch.uint8), torch.randn(1, 256), 10, 4)
    with pytest.raises(BindError, match=r"ggml type 99 \(unknown\)"):
        dequantize(torch.zeros(4, 84, dtype=torch.uint8), 99, 4, 256, torch.float32)


def test_in_features_that_are_not_whole_blocks_are_refused():
    with pytest.raises(CheckpointError, match="in_features 100 is not a whole number of Q4_K blocks .256 values"):
        mul_mat_vec(torch.zeros(4, 144, dtype=torch.uint8), torch.randn(1, 100), int(GGML.Q4_K), 4)


def test_rows_of_the_wrong_size_are_refused():
    with pytest.raises(CheckpointError, match=r"a Q4_0 weight for in_features 64 has 36 bytes per row \(2 blocks "
                                              r"of 18 bytes\); this one has 40"):
        mul_mat_vec(torch.zeros(4, 40, dtype=torch.uint8), torch.randn(1, 64), int(GGML.Q4_0), 4)
    with pytest.raises(CheckpointError, match="a weight of 4 rows cannot give out_features 5"):
        mul_mat_vec(torch.zeros(4, 36, dtype=torch.uint8), torch.randn(1, 64), int(GGML.Q4_0), 5)
    with pytest.raises(IndexError, match=r"0\.\.3"):
        get_rows(torch.zeros(4, 36, dtype=torch.uint8), torch.tensor([4]), int(GGML.Q4_0), 64, torch.float32)


def test_opcheck():
    weight = torch.from_numpy(blocks(GGML.Q5_K, 6, 1))
    args = int(GGML.Q5_K)
    torch.library.opcheck(torch.ops.kernelhub.gguf_mul_mat, (weight, torch.randn(3, 256), args, 6, torch.randn(6)))
    torch.library.opcheck(torch.ops.kernelhub.gguf_mul_mat, (weight, torch.randn(12, 256), args, 6, None))
    torch.library.opcheck(torch.ops.kernelhub.gguf_dequantize, (weight, args, 6, 256, torch.bfloat16))
    torch.library.opcheck(torch.ops.kernelhub.gguf_get_rows, (weight, torch.tensor([[1, 5]]), args, 256,
                                                               torch.float32))


class PackedLinear(torch.nn.Module):
    """A host module as a GGUF checkpoint's quantised Linear holds its weight."""

    def __init__(self, packed: np.ndarray, ggml_type, in_features: int):
        super().__init__()
        self.register_buffer("qweight", torch.from_numpy(packed))
        self.ggml_type, self.in_features, self.out_features = int(ggml_type), in_features, packed.shape[0]
        self.bias = torch.nn.Parameter(torch.randn(packed.shape[0]), requires_grad=False)

    forward = GgufLinear.forward


def test_compiled_whole_and_equal_to_eager():
    torch._dynamo.reset()
    linear = PackedLinear(blocks(GGML.Q6_K, 10, 2), GGML.Q6_K, 512)
    table = torch.from_numpy(blocks(GGML.Q8_0, 20, 16))

    def step(ids, x):
        embedded = get_rows(table, ids, int(GGML.Q8_0), 512, torch.float32)
        whole = dequantize(table, int(GGML.Q8_0), 20, 512, torch.float32)
        return linear(x + embedded), mul_mat_vec(table, x, int(GGML.Q8_0), 20) + whole.sum()

    ids, x = torch.tensor([3, 19]), torch.randn(2, 512)
    compiled = torch.compile(step, fullgraph=True)  # a graph break raises
    with torch.no_grad():
        for got, want in zip(compiled(ids, x), step(ids, x)):
            assert torch.equal(got, want)
        explained = torch._dynamo.explain(step)(ids, x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_the_torch_fallback_gives_the_same_numbers(monkeypatch):
    """Where the C library cannot be built, every call runs on the torch reference (logged once)."""
    ggml_type = GGML.Q5_0
    packed = blocks(ggml_type, 7, 3)
    weight, want = torch.from_numpy(packed), oracle(packed, ggml_type)
    x = [torch.randn(rows, 96) for rows in (1, 8, 16)]
    before = [mul_mat_vec(weight, rows, int(ggml_type), 7) for rows in x]

    def no_compiler(source, *args, **kwargs):
        raise RuntimeError("no C compiler found (set CC, or install gcc)")

    monkeypatch.setattr(gguf_quant, "load_library", no_compiler)
    monkeypatch.setattr(gguf_quant, "_built", None)
    with captured_logs() as records:
        assert not gguf_quant.gguf_kernel_available()
        after = [mul_mat_vec(weight, rows, int(ggml_type), 7) for rows in x]
        assert torch.equal(dequantize(weight, int(ggml_type), 7, 96, torch.float32), want)
        assert torch.equal(get_rows(weight, torch.tensor([2]), int(ggml_type), 96, torch.float32), want[2:3])
    (record,) = [r for r in records if r.name == "kernelhub.backends.gguf_quant" and r.levelname == "WARNING"]
    assert "the GGUF CPU kernel is unavailable: no C compiler found" in record.getMessage()
    for rows, a, b in zip(x, before, after):
        assert_close(b, rows, want)
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * a.abs().max())


@needs_kernel
def test_up_to_32_rows_run_as_passes_of_the_kernel_and_more_as_tiles(monkeypatch):
    """A short prompt reads the packed blocks once per 8 rows (faster than unpacking tiles for a GEMM
    up to 32 rows); only longer inputs unpack tiles into F.linear."""
    packed = blocks(GGML.Q4_0, 16, 2)
    weight, want = torch.from_numpy(packed), oracle(packed, GGML.Q4_0)

    def no_tiles(*args, **kwargs):
        raise AssertionError("unpacked a tile into F.linear")
    monkeypatch.setattr(torch.nn.functional, "linear", no_tiles)
    x = torch.randn(gguf_quant.MAX_PASS_ROWS, 64)
    assert torch.allclose(mul_mat_eager(weight, x, int(GGML.Q4_0), 16), x @ want.T, rtol=0, atol=1e-4)
    with pytest.raises(AssertionError, match="unpacked a tile"):
        mul_mat_eager(weight, torch.randn(gguf_quant.MAX_PASS_ROWS + 1, 64), int(GGML.Q4_0), 16)
