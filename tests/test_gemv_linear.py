"""The built-in `gemv` Linear kernel: one row inside a compiled graph runs as a multiply and a sum over a
materialised row; 2 to 8 rows, and eager calls of 1 to 8, run the AVX2 `skinny_linear` kernel (the
multiply-reduce again in compiled graphs where it cannot be built); other calls run as the oneDNN
kernel or `F.linear` does."""

import re

import pytest
import torch
import torch.nn.functional as F

import kernelhub
from kernelhub.backends import skinny_linear
from kernelhub.backends.gemv_linear import MAX_ROWS, few_rows_linear
from kernelhub.backends.onednn_linear import CACHE, ONEDNN_DTYPES, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN (mkldnn)")
needs_skinny = pytest.mark.skipif(not skinny_linear.skinny_available(),
                                  reason=f"the AVX2 kernel cannot be built here: {skinny_linear.unavailable_reason()}")


@pytest.fixture
def without_skinny(monkeypatch):
    """As on a machine where the AVX2 kernel cannot be built."""
    monkeypatch.setattr(skinny_linear, "_built", (None, "no C compiler found (set CC, or install gcc)"))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [(1, 1), (3, 1), (2, 4)])
def test_few_rows_linear_matches_f_linear(dtype, bias, batch):
    torch.manual_seed(0)
    x, w = torch.randn(*batch, 96, dtype=dtype), torch.randn(40, 96, dtype=dtype)
    b = torch.randn(40, dtype=dtype) if bias else None
    out = few_rows_linear(x, w, b)
    # the exact float32 result of the same products, rounded once to the dtype
    exact = F.linear(x.double(), w.double(), None if b is None else b.double()).to(dtype)
    assert out.shape == (*batch, 40) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)
    else:  # summed in float32, rounded once: within a bf16 ulp of the exact value (2**-8 relative)
        assert ((out.float() - exact.float()).abs() <= exact.float().abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 96), (96,), "strided", (8, 1, 96), (2, 3, 96)])
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_inductor_streams_the_weight_in_passes_without_a_matmul(monkeypatch, request, dtype, bias, shape):
    from torch._inductor.utils import run_and_get_code

    from kernelhub.backends import gemv_linear

    monkeypatch.setattr(gemv_linear, "ROWS_PER_PASS", 16)  # 40 rows: passes of 16, 16 and 8
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # inductor writes OpenMP loops only for more than one thread
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    torch.manual_seed(0)
    w, b = torch.randn(40, 96, dtype=dtype), torch.randn(40, dtype=dtype) if bias else None
    x = torch.randn(1, 1, 192, dtype=dtype)[..., ::2] if shape == "strided" else torch.randn(shape, dtype=dtype)
    torch._dynamo.reset()
    out, (code, *_) = run_and_get_code(torch.compile(few_rows_linear, fullgraph=True, dynamic=False), x, w, b)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double()).to(dtype)
    assert out.shape == exact.shape
    torch.testing.assert_close(out, exact, **({} if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)))
    # inductor's own loops: no call to a library matmul (extern_kernels.mm/addmm, aten mm, oneDNN)
    assert not re.search(r"extern_kernels\.\w+\(|aten\.(addmm|mm|linear)\b|mkldnn", code)
    assert code.count("#pragma omp") >= 1


def _graph_ops(model, ids):
    """The dynamo graph of `model(ids)` and its logits, captured without inductor."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend=keep, fullgraph=True)(ids).logits
    torch._dynamo.reset()
    (graph,) = graphs
    return [str(node.target) for node in graph.graph.nodes if node.op == "call_function"], logits


@needs_onednn
@needs_skinny
def test_compiled_rows_take_the_row_path_or_the_skinny_kernel_and_larger_batches_onednn(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"})
    reference = kernelhub.from_pretrained(tiny_checkpoint)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert linears > 0 and {e.chosen for e in model.binding if e.source == "builtin (Linear)"} == {"gemv"}

    def check(ids, op, tolerance):
        ops, logits = _graph_ops(model, ids)
        assert sum(op in o for o in ops) == linears  # every Linear takes the one path
        assert not any(other in o for o in ops for other in {"force_stride_order", "skinny_linear",
                                                             "onednn_packed_linear", "function linear"} - {op})
        with torch.no_grad():
            torch.testing.assert_close(logits, reference(ids).logits, atol=tolerance, rtol=tolerance)

    check(torch.tensor([[7]]), "force_stride_order", 1e-5)  # one row: inductor's loop, no matmul
    check(torch.arange(3, 3 + MAX_ROWS).reshape(-1, 1), "skinny_linear", 1e-5)  # a decode batch of 8
    nine_rows = torch.arange(3, 3 + MAX_ROWS + 1).reshape(1, -1)
    model(nine_rows)  # an eager call packs the weights, as a prefill would
    check(nine_rows, "onednn_packed_linear", 1e-4)


def test_without_the_skinny_kernel_compiled_rows_take_the_row_path(tiny_checkpoint, without_skinny):
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"})
    reference = kernelhub.from_pretrained(tiny_checkpoint)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    ids = torch.arange(3, 3 + MAX_ROWS).reshape(-1, 1)
    ops, logits = _graph_ops(model, ids)
    assert sum("force_stride_order" in op for op in ops) == linears and not any("skinny" in op for op in ops)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)  # eager


def test_compiled_decode_gives_eager_tokens(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa", kernels={"Linear": "gemv"})
    reference = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    compiled = model.generate(ids, max_new_tokens=16, cache="static", compile=True, eos_token_id=None)
    assert compiled.tolist() == reference.generate(ids, max_new_tokens=16, eos_token_id=None).tolist()
    # a left-padded batch of 3 (compiled as 4 rows): every decode step is a few-rows call
    batch = torch.tensor([[0, 0, 4, 8, 15], [0, 16, 23, 42, 4], [8, 15, 16, 23, 42]])
    mask = (torch.arange(5) >= torch.tensor([[2], [1], [0]])).long()
    compiled = model.generate(batch, attention_mask=mask, max_new_tokens=12, cache="static", compile=True,
                              eos_token_id=None)
    expected = reference.generate(batch, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    assert compiled.tolist() == expected.tolist()


@needs_onednn
def test_eager_calls_of_more_rows_run_as_onednn_or_f_linear(tiny_checkpoint):
    ids = torch.arange(3, 3 + MAX_ROWS + 4).reshape(1, -1)  # 12 rows: a prefill
    gemv = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"})
    onednn = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "onednn"})
    with torch.no_grad():
        assert torch.equal(gemv(ids).logits, onednn(ids).logits)  # the same packed oneDNN op
    assert CACHE in gemv.lm_head.__dict__
    gemv16 = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"}, dtype="bfloat16")
    if torch.bfloat16 in ONEDNN_DTYPES:
        other = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "onednn"}, dtype="bfloat16")
    else:  # oneDNN has no bf16 here: F.linear, exactly the reference
        other = kernelhub.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(gemv16(ids).logits, other(ids).logits)


@needs_skinny
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_few_rows_run_the_skinny_kernel(tiny_checkpoint, dtype):
    gemv = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"}, dtype=dtype)
    reference = kernelhub.from_pretrained(tiny_checkpoint, dtype=dtype)
    from kernelhub.backends import gemv_linear

    calls = []

    def counted(x, weight, bias):
        calls.append(x.shape)
        return skinny_linear.skinny_linear_eager(x, weight, bias)

    ids = torch.tensor([[4], [8], [15]])  # three sequences, one new token each
    with pytest.MonkeyPatch.context() as patch, torch.profiler.profile() as profile, torch.no_grad():
        patch.setattr(gemv_linear, "skinny_linear_eager", counted)
        logits = gemv(ids).logits
    linears = sum(isinstance(m, torch.nn.Linear) for m in gemv.modules())
    assert len(calls) == linears and all(shape[:-1] == (3, 1) for shape in calls)
    ops = [e.name for e in profile.events()]
    assert not any(name in ops for name in ("aten::linear", "mkldnn::_linear_pointwise"))
    assert CACHE not in gemv.lm_head.__dict__  # nothing packed: oneDNN never ran
    with torch.no_grad():
        expected = reference(ids).logits
    if dtype == torch.float32:
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    else:  # summation order differs from F.linear's: a few bf16 ulps after the layers compound it
        torch.testing.assert_close(logits.float(), expected.float(), atol=0.05, rtol=0.05)


@needs_onednn
def test_export_does_not_take_the_row_path(tiny_checkpoint):
    from kernelhub.runtime.export import export_decode_step

    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa", kernels={"Linear": "gemv"})
    cache = model.make_cache("static", batch=1, max_len=16)
    with torch.no_grad():
        model(torch.tensor([[4, 8, 15]]), cache=cache)  # the eager prefill
    targets = [str(n.target) for n in export_decode_step(model, cache).graph.nodes if n.op == "call_function"]
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert not any("force_stride_order" in t for t in targets)  # an exported graph runs as eager calls do
    # the eager 3-row prefill ran the C kernel, or (without it) oneDNN, which packed the weights
    op = "skinny_linear" if skinny_linear.skinny_available() else "onednn_packed_linear"
    op = f"kernelhub.{op}.default"
    assert targets.count(op) == linears


@needs_skinny
def test_recording_autograd_takes_the_op_whose_backward_refuses(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"})
    assert model.lm_head.weight.requires_grad
    logits = model(torch.tensor([[4], [8]])).logits  # grad enabled: no silent gradient-less result
    assert logits.grad_fn is not None
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        logits.sum().backward()


def test_autocast_runs_as_the_reference_decides(tiny_checkpoint):
    gemv = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"})
    reference = kernelhub.from_pretrained(tiny_checkpoint)
    ids = torch.tensor([[4], [8], [15]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = gemv(ids).logits, reference(ids).logits
    torch.testing.assert_close(ours.float(), theirs.float(), atol=0.05, rtol=0.05)


def test_refused_for_training_with_the_reason(tiny_checkpoint):
    with pytest.raises(kernelhub.BindError, match="has_backward=False, cannot train"):
        kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"}, mode="training")
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": ["gemv", "reference"]}, mode="training")
    entry = model.binding["lm_head"]
    assert entry.chosen == "reference" and entry.rejected == (("gemv", ("has_backward=False, cannot train",)),)
