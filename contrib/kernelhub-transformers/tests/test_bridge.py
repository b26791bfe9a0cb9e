"""transformers' own Llama and BERT, run through kernelhub backends, against their own sdpa."""

import pytest
import torch
import transformers

import kernelhub
import kernelhub_transformers
from kernelhub.declare.eager import eager_attention

BACKENDS = ["eager", "sdpa", "flex"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4)
    transformers.BertModel(config).save_pretrained(path)
    return path


def padded():
    ids = torch.randint(0, 96, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_matches_its_own_sdpa(llama_dir, backend):
    ours = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation=f"kernelhub:{backend}")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="sdpa")
    assert ours.config._attn_implementation == f"kernelhub:{backend}"
    ids, mask = padded()
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, theirs(ids, attention_mask=mask).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max() <= 1e-5
    prompt = ids[:1]
    assert torch.equal(ours.generate(prompt, max_new_tokens=6, do_sample=False),
                       theirs.generate(prompt, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_matches_its_own_sdpa(bert_dir, backend):
    ours = transformers.AutoModel.from_pretrained(bert_dir, attn_implementation=f"kernelhub:{backend}")
    theirs = transformers.AutoModel.from_pretrained(bert_dir, attn_implementation="sdpa")
    ids, mask = padded()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask).last_hidden_state
        b = theirs(ids, attention_mask=mask).last_hidden_state
    assert (a[mask.bool()] - b[mask.bool()]).abs().max() <= 1e-5


def test_a_backend_registered_later_is_bridged_with_register(llama_dir):
    calls = []

    def spy(module, q, k, v, mask, **kw):
        calls.append(mask.dtype)
        return eager_attention(module, q, k, v, mask, **kw)

    with kernelhub.scoped_registry():
        kernelhub.register_backend(kernelhub.AttentionBackend("spy", spy, mask_format="bool"))
        assert kernelhub_transformers.register(["spy"]) == ["kernelhub:spy"]
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation="kernelhub:spy")
    ids, _ = padded()
    model(ids)  # unpadded and causal: transformers would skip the mask, but "spy" never opted in to None
    assert calls == [torch.bool, torch.bool]


def test_backends_transformers_cannot_feed_are_left_out_and_refused_by_name():
    assert "kernelhub:flash" not in kernelhub_transformers.register()
    with pytest.raises(ValueError, match="'flash' cannot be bridged to transformers: mask format 'varlen'"):
        kernelhub_transformers.register(["flash"])


@pytest.mark.parametrize("name, phrases", [
    ("kernelhub:flash", ["kernelhub backend 'flash' cannot run inside transformers", "mask format 'varlen'"]),
    ("kernelhub:sdpx", ["kernelhub backends usable here: kernelhub:eager, kernelhub:sdpa",
                        "Did you mean 'kernelhub:sdpa'"]),
])
def test_transformers_refusing_a_kernelhub_name_says_why(llama_dir, name, phrases):
    with pytest.raises(ValueError) as info:
        transformers.AutoModelForCausalLM.from_pretrained(llama_dir, attn_implementation=name)
    message = str(info.value)
    assert "is not supported" in message  # transformers' own sentence, kept
    for phrase in phrases:
        assert phrase in message, message


def test_binding_attention_on_a_transformers_model_points_to_the_bridge(llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(kernelhub.KernelhubError, match="no kernelhub attention sites.*kernelhub-transformers bridge"):
        kernelhub.bind(model, attn_implementation="flex")


def test_layer_kernels_bind_into_a_transformers_model(llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    norms = [p for p, m in model.named_modules() if getattr(type(m), "kernel_layer_name", None) == "RMSNorm"]
    if not norms:  # transformers marks its RMSNorm for hub kernels; this guards the premise
        pytest.fail("transformers' LlamaRMSNorm no longer declares kernel_layer_name")

    class HalfNorm(torch.nn.Module):
        def forward(self, hidden_states):
            return hidden_states * 0.5

    ids, _ = padded()
    plan = kernelhub.bind(model, kernels={"RMSNorm": HalfNorm})
    assert {e.path for e in plan.entries if e.chosen == "HalfNorm"} == set(norms)
    with torch.no_grad():
        out = model.model.norm(torch.ones(1, 2, 64))
    assert torch.equal(out, torch.full((1, 2, 64), 0.5))
