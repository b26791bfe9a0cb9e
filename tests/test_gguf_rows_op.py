"""`kernelhub::gguf_rows`, the decode product as a C++ torch operator (`gguf_ops.cpp`): the same numbers
as the ctypes path for every type, row count, dtype and bias; its checks refuse what would read out of
bounds instead of crashing; graphs record it whole; `GgufLinear` uses it for 1 to 8 rows and falls back
to the Python operator, with equal results, where it cannot be built; and the widest build runs."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as GGML

from kernelhub.backends import gguf_quant
from kernelhub.backends.gguf_linear import GgufLinear
from kernelhub.backends.gguf_quant import TYPES, gguf_kernel_available, mul_mat_eager, rows_op_available
from kernelhub.declare.log import captured_logs

pytestmark = pytest.mark.skipif(not rows_op_available(), reason=f"kernelhub::gguf_rows cannot be built here: "
                                f"{gguf_quant._rows_op or gguf_quant.unavailable_reason()}")


def random_blocks(ggml_type, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random bytes with finite fp16 scale fields: valid blocks of any type."""
    rng = np.random.default_rng(seed)
    values, size = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, (rows, cols // values, size), dtype=np.uint8)
    scales = rng.uniform(-2e-2, 2e-2, (rows, cols // values, 2)).astype(np.float16).view(np.uint8)
    if ggml_type == GGML.Q6_K:
        raw[..., 208:210] = scales[..., :2]
    else:
        raw[..., 0:4] = scales
    return torch.from_numpy(raw.reshape(rows, -1))


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_the_operator_gives_the_ctypes_path_s_numbers(ggml_type):
    """The same C function behind both: equal bit for bit, float32 and bfloat16, with and without a bias."""
    cols = 2 * GGML_QUANT_SIZES[ggml_type][0]
    weight = random_blocks(ggml_type, 37, cols, seed=int(ggml_type))
    for rows in range(1, 9):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)).to(dtype)
            for bias in (None, torch.randn(37).to(dtype)):
                got = torch.ops.kernelhub.gguf_rows(weight, x, int(ggml_type), 37, bias)
                want = mul_mat_eager(weight, x, int(ggml_type), 37, bias)
                assert got.dtype == dtype and torch.equal(got, want), (rows, dtype, bias is None)


def test_leading_dims_are_kept():
    weight = random_blocks(GGML.Q4_K, 5, 256)
    x = torch.randn(2, 1, 3, 256)  # 6 rows
    out = torch.ops.kernelhub.gguf_rows(weight, x, int(GGML.Q4_K), 5, None)
    assert out.shape == (2, 1, 3, 5) and torch.equal(out.reshape(6, 5), mul_mat_eager(weight, x.reshape(6, 256), 12, 5))


def test_blocks_that_do_not_fit_are_refused_not_read():
    """A row of the wrong byte count, a type not served, columns that are not whole blocks, too many
    rows, a bias of the wrong size: each a RuntimeError naming the problem, nothing read out of bounds."""
    weight, x = random_blocks(GGML.Q4_0, 4, 64), torch.randn(1, 64)
    op = torch.ops.kernelhub.gguf_rows
    cases = [((weight[:, :30].contiguous(), x, 2, 4, None), r"rows of 30 bytes is refused \(status -5\)"),
             ((weight, x, 10, 4, None), r"ggml type 10 .*\(status -1\)"),
             ((weight, torch.randn(1, 60), 2, 4, None), r"60 columns .*\(status -2\)"),
             ((weight, torch.randn(9, 64), 2, 4, None), "takes 1 to 8 rows, not 9"),
             ((weight, x, 2, 5, None), "weight has 4 rows, out_features is 5"),
             ((weight, x, 2, 4, torch.randn(3)), "bias must be contiguous float32 or bfloat16 of out_features"),
             ((weight.float(), x, 2, 4, None), "weight must be contiguous 2-D uint8 blocks"),
             ((weight, x.double(), 2, 4, None), "x must be contiguous float32 or bfloat16")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)


def test_opcheck():
    weight = random_blocks(GGML.Q5_K, 6, 256)
    torch.library.opcheck(torch.ops.kernelhub.gguf_rows, (weight, torch.randn(3, 256), int(GGML.Q5_K), 6,
                                                          torch.randn(6)))
    torch.library.opcheck(torch.ops.kernelhub.gguf_rows, (weight, torch.randn(1, 256).bfloat16(), int(GGML.Q5_K), 6,
                                                          None))


class Host(torch.nn.Module):
    """A host module as a GGUF checkpoint's quantised Linear holds its weight."""

    def __init__(self, weight, ggml_type, in_features):
        super().__init__()
        self.register_buffer("qweight", weight)
        self.ggml_type, self.in_features, self.out_features = int(ggml_type), in_features, weight.shape[0]
        self.bias = None

    forward = GgufLinear.forward


def test_a_graph_records_the_operator_whole():
    torch._dynamo.reset()
    linear = Host(random_blocks(GGML.Q6_K, 10, 512), GGML.Q6_K, 512)
    x = torch.randn(2, 512)
    explained = torch._dynamo.explain(linear)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    code = "\n".join(g.code for g in explained.graphs)
    assert "kernelhub.gguf_rows" in code and "gguf_mul_mat" not in code
    with torch.no_grad():
        assert torch.equal(torch.compile(linear, fullgraph=True)(x), linear(x))
    prefill = torch._dynamo.explain(linear)(torch.randn(12, 512))  # more than 8 rows: the Python op's tiles
    assert "gguf_mul_mat" in "\n".join(g.code for g in prefill.graphs)


def test_without_the_operator_the_linear_gives_the_same_numbers(monkeypatch):
    """Where the C++ operator cannot be built (no C++ compiler, say), decode goes through the Python
    operator: equal results, the reason kept and logged, the build not retried at every call."""
    linear = Host(random_blocks(GGML.Q4_1, 33, 96), GGML.Q4_1, 96)
    x = torch.randn(3, 96)
    with torch.no_grad():
        fast = linear(x)
    tries = []

    def no_compiler(source, *args, **kwargs):
        tries.append(source.name)
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")

    monkeypatch.setattr(gguf_quant, "load_library", no_compiler)
    monkeypatch.setattr(gguf_quant, "_rows_op", "")  # as in a process that has not tried yet
    with captured_logs() as records, torch.no_grad():
        slow = [linear(x), linear(x)]
    assert tries == ["gguf_ops.cpp"] and "no C++ compiler found" in gguf_quant._rows_op
    assert any("kernelhub::gguf_rows is unavailable (no C++ compiler found" in r.getMessage() for r in records)
    assert all(torch.equal(s, fast) for s in slow)


@pytest.mark.skipif(not gguf_kernel_available(), reason="the C kernel cannot be built here")
def test_the_widest_build_this_cpu_runs_is_chosen():
    expected = "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"
    assert gguf_quant.instruction_set() == expected == gguf_quant.instruction_sets()[0]
