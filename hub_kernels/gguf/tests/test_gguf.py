"""The kernel against gguf-py's unpacking (the oracle) and against unpack-then-matmul."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

SOURCE = Path(__file__).resolve().parents[1] / "torch-ext" / "gguf" / "__init__.py"
# imported under its own name: the package is called `gguf`, like the gguf-py oracle below
_spec = importlib.util.spec_from_file_location("gguf_hub_kernel", SOURCE,
                                               submodule_search_locations=[str(SOURCE.parent)])
kernel = sys.modules["gguf_hub_kernel"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel)

gguf = pytest.importorskip("gguf", reason="gguf-py, the reference these tests compare against, is not installed")
TYPES = sorted(kernel.GEMV_TYPES)
SCALES = {14: (208, 210)}  # where each type's fp16 scale (and minimum) fields sit in a block


def random_blocks(ggml_type, rows, cols, seed=0):
    """Valid random blocks: random bytes with finite fp16 scales of both signs."""
    values, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows, cols // values, size), generator=gen, dtype=torch.uint8)
    name = gguf.GGMLQuantizationType(ggml_type).name
    start, stop = SCALES.get(ggml_type, (0, 4 if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else 2))
    count = (stop - start) // 2
    signs = torch.randint(0, 2, (rows, cols // values, count), generator=gen) * 2 - 1
    scales = (torch.rand(rows, cols // values, count, generator=gen) * 1.9e-2 + 1e-3) * signs
    raw[..., start:stop] = scales.to(torch.float16).view(torch.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_and_get_rows_give_gguf_py_values(ggml_type):
    w = random_blocks(ggml_type, 6, 512)
    oracle = torch.from_numpy(gguf.quants.dequantize(w.numpy(), gguf.GGMLQuantizationType(ggml_type)).copy())
    torch.testing.assert_close(kernel.dequantize(w, ggml_type, 6, 512, torch.float32), oracle, atol=0, rtol=0)
    ids = torch.tensor([5, 0, 3])
    torch.testing.assert_close(kernel.get_rows(w, ids, ggml_type, 512, torch.float32), oracle[ids], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("rows", [1, 8, 19])
def test_mul_mat_vec_matches_unpack_then_matmul(ggml_type, rows, dtype):
    w = random_blocks(ggml_type, 40, 512, seed=ggml_type)
    x = torch.randn(rows, 512).to(dtype)
    expected = (x.float() @ kernel.dequantize(w, ggml_type, 40, 512, torch.float32).T).to(dtype)
    got = kernel.mul_mat_vec(w, x, ggml_type, 40)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_quantized_values_round_trip_through_gguf_py():
    values = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64)
    w = torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0))
    torch.testing.assert_close(kernel.dequantize(w, 8, 4, 64, torch.float32), torch.from_numpy(values),
                               atol=1e-2, rtol=0)


def test_mul_mat_id_routes_each_token_to_its_experts():
    w = torch.stack([random_blocks(8, 16, 64, seed=e) for e in range(3)])
    x, ids = torch.randn(5, 64), torch.tensor([[0, 2], [1, 1], [2, 0], [0, 1], [2, 2]])
    got = kernel.mul_mat_id(w, x, ids, 8, 16)
    for t in range(5):
        for j in range(2):
            ref = x[t] @ kernel.dequantize(w[ids[t, j]], 8, 16, 64, torch.float32).T
            torch.testing.assert_close(got[t, j], ref, atol=1e-5, rtol=1e-5)


def test_bad_shapes_and_types_are_clear_errors():
    w = random_blocks(8, 4, 64)
    with pytest.raises(ValueError, match="not served"):
        kernel.dequantize(w, 99, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="expected 5 rows"):
        kernel.mul_mat_vec(w, torch.randn(1, 64), 8, 5)


def test_compiles_whole():
    w = random_blocks(12, 16, 256)
    x = torch.randn(2, 256)
    fn = torch.compile(lambda x: kernel.mul_mat_vec(w, x, 12, 16).relu(), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x), kernel.mul_mat_vec(w, x, 12, 16).relu())
