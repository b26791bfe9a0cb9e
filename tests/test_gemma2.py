"""Gemma2 against transformers 5.22.2 on a random checkpoint it wrote: softcaps, sliding/full layers,
(1 + weight) norms, scaled embeddings; every backend the plan accepts, the refusals with their reasons."""

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import kernelhub
from checkpoints import FAMILY_CONFIGS, write_family_checkpoint
from kernelhub.declare.reference_layers import GemmaRMSNorm
from kernelhub.declare.reference_layers import RMSNorm
from tests.unchanged import refused

ACCEPTED = ["eager", "flex", "flash"]  # flash: the Triton kernel under the interpreter on CPU
REFUSED = {"sdpa": "no logit softcap (site uses softcap 1.0)"}
VOCAB = FAMILY_CONFIGS["gemma2"]["vocab_size"]
WINDOW = FAMILY_CONFIGS["gemma2"]["sliding_window"]
HUB_KERNELS = Path(__file__).resolve().parents[1] / "hub_kernels"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma2")
    return path, write_family_checkpoint("gemma2", path)


@pytest.fixture(scope="module")
def eager_model(checkpoint):
    return kernelhub.from_pretrained(checkpoint[0], attn_implementation="eager", dtype="float32")


def padded_batch(seed=1):
    """Two rows of 12 tokens (3x the sliding window), the second left-padded by 5."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    return ids, mask


def test_every_registered_backend_is_accepted_or_refused_here():
    assert {b.name for b in kernelhub.backends()} == set(ACCEPTED) | set(REFUSED)


@pytest.mark.parametrize("backend", ACCEPTED)
def test_logits_match_transformers(checkpoint, backend):
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=backend, dtype="float32")
    assert {e.chosen for e in model.binding.entries if e.kind == "attention"} == {backend}
    ids, mask = padded_batch()
    assert ids.shape[1] > WINDOW
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", sorted(REFUSED))
def test_backends_without_softcap_are_refused_with_the_reason(eager_model, checkpoint, backend):
    refused(eager_model, kernelhub.BindError, [REFUSED[backend], f"'{backend}' cannot serve attention"], attn=backend)
    plan = kernelhub.explain(checkpoint[0], attn_implementation=[backend, "eager"])
    entry = next(e for e in plan.entries if e.kind == "attention")
    assert entry.chosen == "eager"
    assert [n for n, reasons in entry.rejected if any(REFUSED[backend] in r for r in reasons)] == [backend]


def test_softcaps_and_norm_offsets_matter(checkpoint, eager_model):
    """The checkpoint is sized so that each Gemma detail changes the logits (a test that cannot fail is none)."""
    ids, _ = padded_batch()
    with torch.no_grad():
        base = eager_model(ids).logits
        variant = copy.deepcopy(eager_model)
        for site in [m for m in variant.modules() if isinstance(m, kernelhub.AttentionSite)]:
            site.softcap = None
        assert (variant(ids).logits - base).abs().max() > 1e-2
        variant = copy.deepcopy(eager_model)
        variant.config.final_logit_softcapping = None
        assert (variant(ids).logits - base).abs().max() > 1e-2
    assert max(m.weight.abs().max() for m in eager_model.modules() if isinstance(m, GemmaRMSNorm)) > 0.1


def test_bf16_matches_transformers_within_bf16_tolerance(checkpoint):
    path, reference = checkpoint
    theirs_model = copy.deepcopy(reference).to(torch.bfloat16)
    ids, mask = padded_batch()
    valid = mask.bool()
    with torch.no_grad():
        exact = reference(ids, attention_mask=mask).logits[valid]
        theirs = theirs_model(ids, attention_mask=mask).logits.float()[valid]
        for backend in ("eager", "flex"):
            model = kernelhub.from_pretrained(path, attn_implementation=backend, dtype="bfloat16")
            assert model.lm_head.weight.dtype == torch.bfloat16
            ours = model(ids, attention_mask=mask).logits.float()[valid]
            # as close to transformers' bf16 as transformers' bf16 is to fp32 (a few bf16 ulps of the logits)
            bound = max(2 * (theirs - exact).abs().max().item(), 4 * 2 ** -8 * exact.abs().max().item())
            assert (ours - theirs).abs().max() <= bound, backend


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_match_transformers(checkpoint, eager_model, cache):
    _, reference = checkpoint
    ids, mask = padded_batch(seed=2)
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    ours = eager_model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=cache, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


def test_flex_generates_what_eager_generates(checkpoint, eager_model):
    ids, mask = padded_batch(seed=3)
    flex = kernelhub.from_pretrained(checkpoint[0], attn_implementation="flex")
    assert flex.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None).tolist() == \
        eager_model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None).tolist()


@pytest.mark.parametrize("backend", ["paged|eager", "paged|flex", "paged|flash"])
def test_generate_batch_equals_per_prompt_generate(checkpoint, eager_model, backend):
    """Paged cache with blocks of 2 < window 4: sliding layers give blocks back while full ones keep theirs."""
    model = kernelhub.from_pretrained(checkpoint[0], attn_implementation=backend)
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 9, 6)]
    results = model.generate_batch(prompts, max_new_tokens=8, block_size=2, max_batch_tokens=8, eos_token_id=None)
    for prompt, result in zip(prompts, results):
        alone = eager_model.generate([prompt], max_new_tokens=8, eos_token_id=None)[0, len(prompt):].tolist()
        assert result.tokens == alone


def test_explain_shows_the_plan_without_weights(checkpoint, tmp_path):
    shutil.copy(checkpoint[0] / "config.json", tmp_path / "config.json")
    assert not list(tmp_path.glob("*.safetensors"))
    plan = kernelhub.explain(tmp_path)
    attention = [e for e in plan.entries if e.kind == "attention"]
    assert {e.chosen for e in attention} == {"eager"}  # the default sdpa is refused: no softcap
    assert all(any("no logit softcap" in r for _, rs in e.rejected for r in rs) for e in attention)
    layers = {e.source for e in plan.entries if e.kind == "layer"}
    assert {"model (GemmaRMSNorm)", "model (GeluTanhAndMul)"} <= layers
    assert "model (RMSNorm)" not in layers
    flex = kernelhub.explain(tmp_path, attn_implementation="flex")
    assert {e.chosen for e in flex.entries if e.kind == "attention"} == {"flex"}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gemma2"


@pytest.mark.parametrize("kernel", [RMSNorm, f"{HUB_KERNELS / 'rmsnorm'}:RMSNorm"], ids=["in-process", "local"])
def test_a_plain_rmsnorm_kernel_is_refused_for_gemmas_norm(eager_model, kernel):
    refused(eager_model, kernelhub.BindError, ["implements layer 'RMSNorm', not 'GemmaRMSNorm'"],
            kernels={"GemmaRMSNorm": kernel})
    refused(eager_model, kernelhub.KernelhubError, ["'RMSNorm' names no declared layer", "GemmaRMSNorm"],
            kernels={"RMSNorm": kernel})


def test_a_rmsnorm_kernel_repo_without_gemmas_norm_is_refused(eager_model):
    refused(eager_model, kernelhub.BindError, ["has no layer 'GemmaRMSNorm'", "(layers: RMSNorm)"],
            kernels={"GemmaRMSNorm": f"{HUB_KERNELS / 'rmsnorm'}"})


class OffsetRMSNorm(torch.nn.Module):
    """A Gemma norm kernel written another way: one fused expression, same semantics."""

    kernel_layer_name = "GemmaRMSNorm"

    def forward(self, x):
        xf = x.float()
        return (xf * (1.0 + self.weight.float()) / (xf.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()).type_as(x)


def test_a_gemma_norm_kernel_binds_and_matches(checkpoint):
    model = kernelhub.from_pretrained(checkpoint[0], attn_implementation="eager", dtype="float32")
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
        plan = kernelhub.bind(model, "eager", kernels={"GemmaRMSNorm": OffsetRMSNorm})
        after = model(ids, attention_mask=mask).logits
    assert plan["model.norm"].chosen == "OffsetRMSNorm"
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field, value, allowed", [
    ("use_bidirectional_attention", True, "false or null (the causal decoder)"),
    ("attn_logit_softcapping", 0, "a number > 0"),
    ("hidden_activation", "gelu", "'gelu_pytorch_tanh'"),
    ("layer_types", ["sliding_attention"], "a list of num_hidden_layers (3) items"),
])
def test_bad_config_fields_are_refused_by_name(checkpoint, tmp_path, field, value, allowed):
    config = json.loads((checkpoint[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(kernelhub.ConfigError, match=f"'{field}' is .*; allowed: " + re.escape(allowed)):
        kernelhub.explain(tmp_path)
