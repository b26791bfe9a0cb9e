"""`kernelhub::skinny_linear`, the AVX2 kernel for 1 to 8 rows: exact against a float64 oracle, a
torch.library op that passes opcheck, clear refusals, a build that is cached and says why it fails,
and correct results from threads that call it at once."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from kernelhub.backends import skinny_linear
from kernelhub.backends.skinny_linear import MAX_ROWS, skinny_available, unavailable_reason
from kernelhub.declare.log import captured_logs

pytestmark = pytest.mark.skipif(not skinny_available(), reason=f"cannot be built here: {unavailable_reason()}")


def _close_to_exact(out, x, w, b):
    """Summed in float32 and rounded once: float32 within float32 summation error, bfloat16 within one ulp."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == exact.shape and out.dtype == x.dtype
    if x.dtype == torch.float32:  # float32 summation error grows with the sum of |products|
        scale = F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
        assert ((out.double() - exact).abs() <= scale * 2**-16 + 1e-6).all()
    else:
        assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
# columns: scalar only (3), one 8-wide step (8), whole unrolled blocks for every row count (64),
# blocks then 8-wide steps then a scalar tail (100), and a long row (1000)
@pytest.mark.parametrize("k", [3, 8, 64, 100, 1000])
def test_every_row_count_matches_the_exact_product(dtype, rows, k):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 1, k, dtype=dtype), torch.randn(37, k, dtype=dtype), torch.randn(37, dtype=dtype)
    _close_to_exact(torch.ops.kernelhub.skinny_linear(x, w, b), x, w, b)
    _close_to_exact(torch.ops.kernelhub.skinny_linear(x, w, None), x, w, None)


@pytest.mark.parametrize("rows", [1, 4, 8])
def test_bfloat16_outputs_are_the_float32_sums_rounded_once_to_nearest_even(rows):
    """bf16 in, bf16 out: the kernel widens inputs, sums in float32 in the same order as the float32
    kernel, and rounds each output once as torch does, NaN and infinities included."""
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, 200).bfloat16(), torch.randn(300, 200).bfloat16(), torch.randn(300).bfloat16()
    w[0, 5], w[1, 7], w[2, 0] = float("nan"), float("inf"), -float("inf")
    x = x * 4  # sums large enough that many round up or down
    got = torch.ops.kernelhub.skinny_linear(x, w, b)
    want = torch.ops.kernelhub.skinny_linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
    numbers = ~want.isnan()  # NaN bit patterns differ between torch's own paths; NaN stays NaN
    assert torch.equal(got[numbers].view(torch.int16), want[numbers].view(torch.int16))
    assert torch.equal(got.isnan(), want.isnan()) and got[:, 0].isnan().all()
    assert (got[:, 1].abs() == float("inf")).all()


def test_strided_input_and_weight():
    torch.manual_seed(0)
    x = torch.randn(3, 64)[:, ::2]  # not contiguous
    w = torch.randn(32, 20).t()  # [20, 32], not contiguous
    _close_to_exact(torch.ops.kernelhub.skinny_linear(x, w, None), x, w, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    x, w, b = torch.randn(4, 48, dtype=dtype), torch.randn(24, 48, dtype=dtype), torch.randn(24, dtype=dtype)
    torch.library.opcheck(torch.ops.kernelhub.skinny_linear, (x, w, b))
    torch.library.opcheck(torch.ops.kernelhub.skinny_linear, (x[:1], w, None))


@pytest.mark.parametrize("x,w,message", [
    (torch.randn(MAX_ROWS + 1, 16), torch.randn(4, 16), "x has 9 rows; 1 to 8 are served"),
    (torch.randn(2, 16), torch.randn(4, 16, dtype=torch.bfloat16),
     "dtypes torch.float32 and torch.bfloat16; both must be one of float32, bfloat16"),
    (torch.randn(2, 16, dtype=torch.float16), torch.randn(4, 16, dtype=torch.float16), "both must be one of"),
    (torch.randn(2, 16), torch.randn(4, 15), r"weight of shape \(4, 15\) cannot multiply x with 16 columns"),
])
def test_bad_inputs_are_refused_with_the_problem(x, w, message):
    with pytest.raises(ValueError, match=message):
        torch.ops.kernelhub.skinny_linear(x, w, None)


@pytest.mark.parametrize("bias", [torch.randn(3), torch.randn(1, 4), torch.randn(4, device="meta")])
def test_a_bias_that_does_not_fit_is_refused(bias):
    # called as eager decode calls it (the op itself would dispatch a meta bias to its fake)
    with pytest.raises(ValueError, match=r"bias of shape .*; it must be \(4,\) on the CPU"):
        skinny_linear.skinny_linear_eager(torch.randn(2, 16), torch.randn(4, 16), bias)


def test_the_build_is_cached_by_source_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path))
    monkeypatch.setattr(skinny_linear, "_built", None)
    assert skinny_available()
    (built,) = (tmp_path / "cpu").glob("skinny_linear-*.so")
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(skinny_linear, "_built", None)  # a new process, say: reuses the file
    assert skinny_available() and built.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cpu").iterdir()] == [built.name]  # no temporary files left


def test_a_failed_build_says_why_and_the_op_refuses(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(skinny_linear, "_built", None)
    with captured_logs() as records:
        assert not skinny_available()
    assert "no-such-compiler" in unavailable_reason()
    (record,) = [r for r in records if r.name == "kernelhub.backends.skinny_linear"]
    assert "the AVX2 skinny Linear kernel is unavailable" in record.getMessage()
    with pytest.raises(RuntimeError, match="kernelhub::skinny_linear is unavailable: .*no-such-compiler"):
        torch.ops.kernelhub.skinny_linear(torch.randn(1, 8), torch.randn(2, 8), None)


def test_a_compiler_error_is_reported_and_leaves_no_files(tmp_path, monkeypatch):
    compiler = tmp_path / "broken-cc"
    compiler.write_text("#!/bin/sh\necho 'fatal error: no AVX2 here' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setattr(skinny_linear, "_built", None)
    with captured_logs():
        assert not skinny_available()
    assert "failed: fatal error: no AVX2 here" in unavailable_reason()
    assert list((tmp_path / "cache" / "cpu").iterdir()) == []  # no object, no half-written library


def test_a_cache_others_can_write_to_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path))
    monkeypatch.setattr(skinny_linear, "_built", None)
    assert skinny_available()
    (built,) = (tmp_path / "cpu").glob("skinny_linear-*.so")
    built.chmod(0o777)  # anyone could have replaced it with their own code
    monkeypatch.setattr(skinny_linear, "_built", None)
    with captured_logs():
        assert not skinny_available()
    assert "is not private to this user" in unavailable_reason() and "mode 777" in unavailable_reason()


def test_threads_calling_at_once_get_their_own_results():
    torch.manual_seed(0)
    w = torch.randn(4096, 1024)  # 16 MB: each call takes milliseconds
    inputs = [torch.randn(1 + i % MAX_ROWS, 1024) for i in range(6)]
    expected = [F.linear(x.double(), w.double()) for x in inputs]
    errors, wrong, spans = [], [], []

    def work(i):
        try:
            for _ in range(10):
                start = time.perf_counter()
                out = torch.ops.kernelhub.skinny_linear(inputs[i], w, None)
                spans.append((start, time.perf_counter()))
                if not torch.allclose(out.double(), expected[i], atol=1e-3, rtol=1e-4):
                    wrong.append(i)
        except Exception as e:  # noqa: BLE001 - counted, then every thread's outcome is checked below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and wrong == [] and len(spans) == 60
    # A call that started well inside another's span ran while that one was in the kernel: only
    # possible because the kernel runs without the GIL.
    margin = 2e-4
    inside = sum(any(s0 + margin < s1 < e0 - margin for s0, e0 in spans) for s1, _ in spans)
    assert inside > 0
