"""The built-in `gemv` Linear kernel: a one-row input inside a compiled graph runs as a multiply and a
row sum over a materialised row; every other call runs as the oneDNN kernel or `F.linear` does."""

import re

import pytest
import torch
import torch.nn.functional as F

import kernelhub
from kernelhub.backends.gemv_linear import row_linear
from kernelhub.backends.onednn_linear import CACHE, bf16_supported, onednn_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN (mkldnn)")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_linear_matches_f_linear(dtype, bias):
    torch.manual_seed(0)
    x, w = torch.randn(1, 1, 96, dtype=dtype), torch.randn(40, 96, dtype=dtype)
    b = torch.randn(40, dtype=dtype) if bias else None
    out = row_linear(x, w, b)
    # the exact float32 result of the same products, rounded once to the dtype
    exact = F.linear(x.double(), w.double(), None if b is None else b.double()).to(dtype)
    assert out.shape == (1, 1, 40) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)
    else:  # summed in float32, rounded once: within a bf16 ulp of the exact value (2**-8 relative)
        assert ((out.float() - exact.float()).abs() <= exact.float().abs() * 2**-8 + 1e-6).all()


@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 96), (96,), "strided"])
@pytest.mark.parametrize("dtype,bias", [(torch.float32, True), (torch.bfloat16, True), (torch.float32, False)])
def test_inductor_streams_the_weight_in_passes_without_a_matmul(monkeypatch, dtype, bias, shape):
    from torch._inductor.utils import run_and_get_code

    from kernelhub.backends import gemv_linear

    monkeypatch.setattr(gemv_linear, "ROWS_PER_PASS", 16)  # 40 rows: passes of 16, 16 and 8
    torch.manual_seed(0)
    w, b = torch.randn(40, 96, dtype=dtype), torch.randn(40, dtype=dtype) if bias else None
    x = torch.randn(1, 1, 192, dtype=dtype)[..., ::2] if shape == "strided" else torch.randn(shape, dtype=dtype)
    torch._dynamo.reset()
    out, (code, *_) = run_and_get_code(torch.compile(row_linear, fullgraph=True, dynamic=False), x, w, b)
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
def test_compiled_one_row_takes_the_row_path_and_batches_do_not(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"})
    reference = kernelhub.from_pretrained(tiny_checkpoint)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert linears > 0 and {e.chosen for e in model.binding if e.source == "builtin (Linear)"} == {"gemv"}

    one_row = torch.tensor([[7]])
    ops, logits = _graph_ops(model, one_row)
    assert sum("force_stride_order" in op for op in ops) == linears  # every Linear materialises its row
    assert not any("linear" in op for op in ops)  # and none runs a matmul
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(one_row).logits, atol=1e-5, rtol=1e-5)

    model(torch.tensor([[7, 8]]))  # an eager call packs the weights, as a prefill would
    ops, logits = _graph_ops(model, torch.tensor([[7, 8]]))
    assert sum("onednn_packed_linear" in op for op in ops) == linears
    assert not any("force_stride_order" in op for op in ops)
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(torch.tensor([[7, 8]])).logits, atol=1e-4, rtol=1e-4)


def test_compiled_decode_gives_eager_tokens(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa", kernels={"Linear": "gemv"})
    reference = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    compiled = model.generate(ids, max_new_tokens=16, cache="static", compile=True, eos_token_id=None)
    assert compiled.tolist() == reference.generate(ids, max_new_tokens=16, eos_token_id=None).tolist()


@needs_onednn
def test_eager_calls_run_as_onednn_or_f_linear(tiny_checkpoint):
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    gemv = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"})
    onednn = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "onednn"})
    with torch.no_grad():
        assert torch.equal(gemv(ids).logits, onednn(ids).logits)  # the same packed oneDNN op
    assert CACHE in gemv.lm_head.__dict__
    gemv16 = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"}, dtype="bfloat16")
    if bf16_supported():
        other = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "onednn"}, dtype="bfloat16")
    else:  # oneDNN has no bf16 here: F.linear, exactly the reference
        other = kernelhub.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    with torch.no_grad():
        assert torch.equal(gemv16(ids).logits, other(ids).logits)


@needs_onednn
def test_export_does_not_take_the_row_path(tiny_checkpoint):
    from kernelhub.models.export import export_decode_step

    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa", kernels={"Linear": "gemv"})
    cache = model.make_cache("static", batch=1, max_len=16)
    with torch.no_grad():
        model(torch.tensor([[4, 8, 15]]), cache=cache)  # the eager prefill packs the weights
    targets = [str(n.target) for n in export_decode_step(model, cache).graph.nodes if n.op == "call_function"]
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert not any("force_stride_order" in t for t in targets)  # an exported graph runs as eager calls do
    assert sum("onednn_packed_linear" in t for t in targets) == linears


def test_refused_for_training_with_the_reason(tiny_checkpoint):
    with pytest.raises(kernelhub.BindError, match="has_backward=False, cannot train"):
        kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": "gemv"}, mode="training")
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"Linear": ["gemv", "reference"]}, mode="training")
    entry = model.binding["lm_head"]
    assert entry.chosen == "reference" and entry.rejected == (("gemv", ("has_backward=False, cannot train",)),)
