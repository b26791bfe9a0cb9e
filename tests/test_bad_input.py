"""Bad input: a clear error naming the problem and the valid choices; model and registry untouched."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernelhub
from tests.unchanged import assert_unchanged, registry_snapshot, snapshot
from kernelhub.declare.eager import eager_attention
from kernelhub.testing.samples import TINY_LLAMA, write_random_checkpoint


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="flex")


BIND_CASES = [
    # (attn_implementation, kwargs, error type, phrases the message must contain)
    ("spda", {}, kernelhub.UnknownBackendError, ["'spda'", "Did you mean 'sdpa'", "Valid names", "eager"]),
    ("", {}, kernelhub.KernelhubError, ["empty name", "Accepted forms"]),
    (42, {}, kernelhub.KernelhubError, ["must be a string", "int", "Accepted forms"]),
    ({}, {}, kernelhub.KernelhubError, ["dict is empty"]),
    ({"*": 3}, {}, kernelhub.KernelhubError, ["value for key '*'", "int"]),
    ({"model.decoder.*": "sdpa", "*": "eager"}, {}, kernelhub.BindError,
     ["'model.decoder.*' matches no attention site", "sliding_attention", "model.layers.0.self_attn.attn"]),
    ({"model.layers.0.*": "sdpa"}, {}, kernelhub.BindError, ["no entry for attention site", "Add a '*' entry"]),
    ([], {}, kernelhub.KernelhubError, ["empty preference list"]),
    (["sdpa", None], {}, kernelhub.KernelhubError, ["entry 1 must be a string"]),
    ("stranger-org/flash-attn@v1:fwd", {}, kernelhub.KernelhubError, ["not trusted", "KERNELHUB_TRUSTED=stranger-org"]),
    ("bogus|sdpa", {}, kernelhub.KernelhubError, ["unknown prefix", "paged|"]),
    ("sdpa", {"mode": "serving"}, kernelhub.KernelhubError, ["unknown mode 'serving'", "inference, training, compile"]),
    ("sdpa", {"kernels": {"RMSNorm2": "x"}}, kernelhub.KernelhubError,
     ["'RMSNorm2' names no declared layer", "Did you mean 'RMSNorm'", "SiLUAndMul"]),
    ("sdpa", {"kernels": {"RMSNorm": 3}}, kernelhub.KernelhubError, ["breaks the layer contract", "forward(self, x)"]),
    ("sdpa", {"kernels": {"RMSNorm": "fastest"}}, kernelhub.KernelhubError, ["no kernel 'fastest'", "reference"]),
    ("sdpa", {"kernels": ["RMSNorm"]}, kernelhub.KernelhubError, ["kernels must be a dict"]),
]


@pytest.mark.parametrize("attn, kwargs, error, phrases", BIND_CASES, ids=[repr(c[0])[:30] + str(i)
                                                                          for i, c in enumerate(BIND_CASES)])
def test_bad_bind_request_is_refused_and_changes_nothing(model, attn, kwargs, error, phrases):
    before, registry_before = snapshot(model), registry_snapshot()
    with pytest.raises(error) as info:
        kernelhub.bind(model, attn, **kwargs)
    for phrase in phrases:
        assert phrase in str(info.value), str(info.value)
    assert_unchanged(model, before)
    assert registry_snapshot() == registry_before
    assert model.binding.chosen() == {"flex"}


def test_failed_rebind_keeps_previous_binding_and_outputs(model):
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        expected = model(ids).logits
    with pytest.raises(kernelhub.UnknownBackendError):
        kernelhub.bind(model, {"full_attention": "eager", "*": "nope"})
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=0, rtol=0)


def test_sdpa_cannot_return_attention_weights(tiny_checkpoint):
    with pytest.raises(kernelhub.BindError) as info:
        kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa", output_attentions=True)
    assert "cannot return attention weights" in str(info.value) and "eager can" in str(info.value)
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation=["sdpa", "eager"], output_attentions=True)
    assert model.binding.chosen() == {"eager"}
    assert model.binding.entries[0].rejected[0][0] == "sdpa"
    out = model(torch.tensor([[1, 2, 3]]))
    assert len(out.attentions) == TINY_LLAMA["num_hidden_layers"] and out.attentions[0].shape == (1, 4, 3, 3)


def test_flex_with_dropout_in_training_is_refused(tmp_path):
    write_random_checkpoint(tmp_path, {**TINY_LLAMA, "attention_dropout": 0.1})
    with pytest.raises(kernelhub.BindError) as info:
        kernelhub.from_pretrained(tmp_path, attn_implementation="flex", mode="training")
    assert "no attention dropout in training (site dropout 0.1)" in str(info.value)
    assert "Valid backends: eager, sdpa, flex" in str(info.value)


def test_preference_list_where_nothing_fits_lists_every_reason(tiny_checkpoint):
    with pytest.raises(kernelhub.BindError) as info:
        kernelhub.from_pretrained(tiny_checkpoint, attn_implementation=["sdpa", "flex"], output_attentions=True)
    message = str(info.value)
    assert "none of ['sdpa', 'flex']" in message
    assert "sdpa: cannot return attention weights" in message and "flex: cannot return attention weights" in message


def test_flex_refuses_a_head_dim_it_cannot_compile_on_cuda_and_runs_it_on_cpu(tmp_path):
    write_random_checkpoint(tmp_path, {**TINY_LLAMA, "hidden_size": 32})  # head_dim 8
    with pytest.raises(kernelhub.BindError, match=r"flex.*supports head_dim 16\.\.256, not 8"):
        kernelhub.explain(tmp_path, attn_implementation="flex", device="cuda")
    flex = kernelhub.from_pretrained(tmp_path, attn_implementation="flex")
    eager = kernelhub.from_pretrained(tmp_path, attn_implementation="eager")
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(flex(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-5)  # autograd on, no no_grad


def test_missing_config(tmp_path):
    with pytest.raises(kernelhub.CheckpointError, match="has no config.json"):
        kernelhub.from_pretrained(tmp_path)
    with pytest.raises(kernelhub.CheckpointError, match="does not exist"):
        kernelhub.from_pretrained(tmp_path / "nope")


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(kernelhub.CheckpointError, match="config.json is not valid JSON"):
        kernelhub.from_pretrained(tmp_path)


def test_missing_weights(tiny_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    with pytest.raises(kernelhub.CheckpointError, match="expected model.safetensors or model.safetensors.index.json"):
        kernelhub.from_pretrained(tmp_path)


def test_unsupported_model_type(tiny_checkpoint, tmp_path):
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "lama"}))
    with pytest.raises(kernelhub.CheckpointError) as info:
        kernelhub.from_pretrained(tmp_path)
    assert "unsupported model_type 'lama'" in str(info.value) and "Did you mean 'llama'" in str(info.value)
    assert "llama, mistral, qwen2" in str(info.value)


def test_wrong_tensor_shape_is_named(tiny_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    state = load_file(tiny_checkpoint / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(5, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(kernelhub.CheckpointError) as info:
        kernelhub.from_pretrained(tmp_path)
    assert "'model.layers.1.self_attn.k_proj.weight' has shape (5, 64)" in str(info.value)
    assert "expects (32, 64)" in str(info.value)


def test_missing_and_unexpected_tensors_are_named(tiny_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    state = load_file(tiny_checkpoint / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(kernelhub.CheckpointError, match="lacks 1 weight.*model.norm.weight"):
        kernelhub.from_pretrained(tmp_path)
    state["model.norm.weight"] = torch.ones(64)
    state["model.extra.weight"] = torch.ones(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(kernelhub.CheckpointError, match="does not use: model.extra.weight"):
        kernelhub.from_pretrained(tmp_path)


def test_truncated_safetensors_names_the_file(tiny_checkpoint, tmp_path):
    (tmp_path / "config.json").write_text((tiny_checkpoint / "config.json").read_text())
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(kernelhub.CheckpointError, match=r"cannot read .*model.safetensors.*truncated"):
        kernelhub.from_pretrained(tmp_path)


@pytest.mark.parametrize("dtype", ["int8", torch.int8, "float64"])
def test_unsupported_dtype(tiny_checkpoint, dtype):
    with pytest.raises(kernelhub.CheckpointError, match="unsupported dtype.*(valid|float32)"):
        kernelhub.from_pretrained(tiny_checkpoint, dtype=dtype)


def test_backend_without_mask_format_is_refused():
    before = registry_snapshot()
    with pytest.raises(kernelhub.RegistrationError) as info:
        kernelhub.register_backend(kernelhub.AttentionBackend("nomask", eager_attention))
    assert "no mask_format given" in str(info.value) and "additive, bool, block_mask" in str(info.value)
    with pytest.raises(kernelhub.RegistrationError, match="mask_format 'dense' is not one of"):
        kernelhub.register_backend(kernelhub.AttentionBackend("dense", eager_attention, mask_format="dense"))
    assert registry_snapshot() == before


def test_duplicate_backend_name_needs_replace():
    before = registry_snapshot()
    with pytest.raises(kernelhub.RegistrationError) as info:
        kernelhub.register_backend(kernelhub.AttentionBackend("sdpa", eager_attention, mask_format="bool"))
    assert "already registered by builtin" in str(info.value) and "replace=True" in str(info.value)
    with pytest.raises(kernelhub.RegistrationError, match="'flex_attention' .* already registered"):
        kernelhub.register_backend(kernelhub.AttentionBackend("mine", eager_attention, mask_format="bool",
                                                              aliases=("flex_attention",)))
    assert registry_snapshot() == before
    kernelhub.register_backend(kernelhub.AttentionBackend("sdpa", eager_attention, mask_format="bool"), replace=True)
    assert kernelhub.get_registry().get("sdpa").backend.fn is eager_attention
    with pytest.raises(kernelhub.UnknownBackendError):
        kernelhub.get_registry().get("scaled_dot_product")  # the old backend's aliases went with it


def test_unregister_unknown_backend():
    with pytest.raises(kernelhub.UnknownBackendError, match="no backend named 'sdpaa'.*Did you mean 'sdpa'"):
        kernelhub.unregister_backend("sdpaa")


def test_generate_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown cache 'paged'; valid: dynamic, static"):
        model.generate(torch.tensor([[1, 2]]), cache="paged")
    with pytest.raises(ValueError, match="input_ids is empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long))


def test_transformers_spelling_of_an_unregistered_backend_is_explained(model):
    kernelhub.unregister_backend("flash")
    with pytest.raises(kernelhub.UnknownBackendError) as info:
        kernelhub.bind(model, "flash_attention_2")
    assert "transformers' name for 'flash', which no registered backend provides" in str(info.value)
    assert "Valid names" in str(info.value)


def test_transformers_spelling_resolves_to_a_registered_backend(model):
    assert kernelhub.bind(model, "flash_attention_2").chosen() == {"flash"}
    kernelhub.register_backend(kernelhub.AttentionBackend("flash", eager_attention, mask_format="bool"), replace=True)
    assert kernelhub.bind(model, "flash_attention_2").chosen() == {"flash"}
