"""`kernelhub::skinny_linear`, the AVX2 kernel for 1 to 8 rows: exact against a float64 oracle, a
torch.library op that passes opcheck, clear refusals, a build that is cached and says why it fails,
and correct results from threads that call it at once."""

import threading

import pytest
import torch
import torch.nn.functional as F

from kernelhub.backends import skinny_linear
from kernelhub.backends.skinny_linear import MAX_ROWS, skinny_available, unavailable_reason
from kernelhub.declare.log import captured_logs

pytestmark = pytest.mark.skipif(not skinny_available(), reason=f"cannot be built here: {unavailable_reason()}")


def _close_to_exact(out, x, w, b):
    """Summed in float32 and rounded once: float32 within float32 rounding, bfloat16 within one ulp."""
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert out.shape == exact.shape and out.dtype == x.dtype
    if x.dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, atol=1e-5, rtol=1e-5)
    else:
        assert ((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", range(1, MAX_ROWS + 1))
def test_every_row_count_matches_the_exact_product(dtype, rows):
    torch.manual_seed(rows)
    # 100 columns: twelve 8-wide steps and a scalar tail of 4; 37 outputs split across threads
    x, w, b = torch.randn(rows, 1, 100, dtype=dtype), torch.randn(37, 100, dtype=dtype), torch.randn(37, dtype=dtype)
    _close_to_exact(torch.ops.kernelhub.skinny_linear(x, w, b), x, w, b)
    _close_to_exact(torch.ops.kernelhub.skinny_linear(x, w, None), x, w, None)


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


def test_threads_calling_at_once_get_their_own_results():
    torch.manual_seed(0)
    w = torch.randn(512, 256)
    inputs = [torch.randn(1 + i % MAX_ROWS, 256) for i in range(8)]
    expected = [F.linear(x.double(), w.double()) for x in inputs]
    errors, wrong, overlap, running = [], [], [], [0]
    lock = threading.Lock()

    def work(i):
        try:
            for _ in range(25):
                with lock:
                    running[0] += 1
                    overlap.append(running[0])
                out = torch.ops.kernelhub.skinny_linear(inputs[i], w, None)
                with lock:
                    running[0] -= 1
                if not torch.allclose(out.double(), expected[i], atol=1e-4, rtol=1e-4):
                    wrong.append(i)
        except Exception as e:  # noqa: BLE001 - counted, then every thread's outcome is checked below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and wrong == []
    assert max(overlap) > 1  # calls really overlapped (ctypes releases the GIL around the kernel)
