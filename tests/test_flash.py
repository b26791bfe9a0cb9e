"""`flash`: the choice per device recorded in the plan, refusals, and flash-attn's API bound
through a test double. Its numbers against eager and the oracle are in test_backend_parity."""

import pytest
import torch

import kernelhub
from kernelhub.declare.site import AttentionSite
from kernelhub.registry.capabilities import unsupported
from tests.unchanged import assert_unchanged, snapshot
from flash_attn_double import install_flash_attn


def flash(device="cpu", dtype=torch.float32):
    return kernelhub.get_registry().get("flash").backend.resolution(device, dtype)


def run(resolution, q, k, v, mask, site):
    site.set_implementation("flash", resolution.fn, "varlen", paged_fn=resolution.paged_fn)
    return site(q, k, v, mask)[0]


def test_chunked_attention_is_refused_with_the_reason():
    site = AttentionSite(head_dim=32, num_heads=2, chunk_size=4)
    backend = kernelhub.get_registry().get("flash").backend
    assert any("no chunked attention" in r for r in unsupported(backend, site, "cpu", torch.float32))


def test_plan_records_the_triton_kernel_and_why(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="flash_attention_2")
    entry = next(e for e in model.binding.entries if e.kind == "attention")
    assert entry.chosen == "flash"
    assert entry.note == "kernelhub Triton flash kernel (Triton interpreter)"
    ids = torch.randint(0, 96, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        kernelhub.bind(model, "eager")
        reference = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out[0], reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 2:], reference[1, 2:], atol=1e-5, rtol=1e-5)


def test_cpu_without_the_interpreter_is_a_clear_error(tiny_checkpoint, monkeypatch):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    before = snapshot(model)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(kernelhub.BindError, match="flash needs CUDA") as err:
        kernelhub.bind(model, "flash")
    assert "Valid backends: eager, sdpa, flex (those that run on cpu)" in str(err.value)
    assert_unchanged(model, before)
    plan = kernelhub.bind(model, ["flash", "sdpa"])  # a preference list falls through, with the reason kept
    assert plan.chosen() == {"sdpa"}
    assert any("flash needs CUDA" in r for e in plan.entries for n, rs in e.rejected for r in rs)


def test_flash_attn_is_bound_on_cuda_and_recorded(tiny_checkpoint, monkeypatch):
    fa = install_flash_attn(monkeypatch)
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager", dtype="bfloat16")
    ids = torch.randint(0, 96, (1, 7))
    with torch.no_grad():
        reference = model(ids).logits
    plan = kernelhub.bind(model, "flash", device="cuda")  # the plan for CUDA; the double computes on CPU
    assert {e.note for e in plan.entries if e.kind == "attention"} == {"flash-attn 2.7.4"}
    with torch.no_grad():
        out = model(ids).logits
    assert fa.calls and not fa.calls[0]["paged"] and fa.calls[0]["causal"]
    torch.testing.assert_close(out, reference, atol=3e-2, rtol=3e-2)


def test_float32_on_cuda_takes_the_triton_kernel_and_says_why(monkeypatch):
    install_flash_attn(monkeypatch)
    resolution = flash("cuda", torch.float32)
    assert resolution.note == "flash-attn takes float16/bfloat16, not float32; kernelhub Triton flash kernel (cuda)"
    assert flash("cuda", torch.bfloat16).note == "flash-attn 2.7.4"


@pytest.mark.parametrize("block_size, q_lens, call", [
    (256, [1, 3], "varlen with block_table"), (256, [1, 1], "with_kvcache"), (16, [1, 3], "varlen, gathered"),
])
def test_flash_attn_reads_block_tables_natively_when_its_page_size_allows(monkeypatch, block_size, q_lens, call):
    """flash-attn 2 pages must be multiples of 256 positions; smaller blocks are gathered first.
    Decode-only steps take flash-attn's kvcache (split-KV decode) kernel."""
    from kernelhub.declare.paged import PagedMask

    fa = install_flash_attn(monkeypatch)
    resolution = flash("cuda", torch.bfloat16)
    pool_k = torch.randn(4, block_size, 2, 32, dtype=torch.bfloat16)
    pool_v = torch.randn(4, block_size, 2, 32, dtype=torch.bfloat16)
    mask = PagedMask.build(q_lens=q_lens, kv_lens=[5, block_size + 3], block_tables=[[2], [3, 1]],
                           block_size=block_size)
    q = torch.randn(1, 4, sum(q_lens), 32, dtype=torch.bfloat16)
    site = AttentionSite(head_dim=32, num_heads=4, num_kv_heads=2)
    out = run(resolution, q, pool_k, pool_v, mask, site)
    made = fa.calls[-1]
    assert {"varlen with block_table": made["paged"] and "kvcache" not in made, "with_kvcache": "kvcache" in made,
            "varlen, gathered": not made["paged"]}[call]
    site.unbind()
    torch.testing.assert_close(out, site(q, pool_k, pool_v, mask)[0], atol=3e-2, rtol=3e-2)


def test_hub_flash_kernel_binds_through_the_hub(hub, tiny_checkpoint):
    """Our kernel as a Hub repo: `org/flash-attention` binds through the Hub attention path."""
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    ids = torch.randint(0, 96, (2, 6))
    with torch.no_grad():
        reference = model(ids).logits
    plan = kernelhub.bind(model, "kernelhub-test/flash-attention@v1:flash_attn_varlen_func")
    assert {e.source for e in plan.entries if e.kind == "attention"} == \
        {f"hub kernelhub-test/flash-attention@{hub.commits['flash-attention']}:flash_attn_varlen_func"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)
