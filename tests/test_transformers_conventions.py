"""Models shaped like transformers': outputs, loss, caches, properties, from_pretrained and generate keywords.

transformers' own LlamaForCausalLM writes the checkpoint and is the oracle for every generate option.
"""

import contextlib
import io
import warnings

import pytest
import torch
import transformers

import kernelhub
from kernelhub.models.bert import BertModel
from kernelhub.models.outputs import CausalLMOutput, EncoderOutput

PROMPTS = torch.tensor([[5, 9, 3, 17, 22], [40, 2, 33, 8, 11]])


class WordTokenizer:
    """The smallest tokenizer generate, stop strings and TextStreamer need: token i reads "w<i> "."""

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(f"w{int(i)} " for i in ids)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Llama written by transformers (config.json, generation_config.json with eos 2)."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf-llama")
    reference.save_pretrained(path)
    return path, reference


@pytest.fixture(scope="module")
def model(checkpoint):
    with kernelhub.scoped_registry(fresh=True, autoload=False):
        return kernelhub.from_pretrained(checkpoint[0], attn_implementation="sdpa")


@pytest.fixture
def reference(checkpoint):
    return checkpoint[1]


def theirs(reference, ids, **kwargs):
    with torch.no_grad():
        return reference.generate(ids, do_sample=False, **kwargs)


# -- forward ------------------------------------------------------------------------------

def test_loss_equals_transformers(model, reference):
    ids = torch.randint(0, 64, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    ours = model(ids, labels=labels)
    with torch.no_grad():
        expected = reference(ids, labels=labels).loss
    assert abs(ours.loss.item() - expected.item()) <= 1e-5
    assert model(ids).loss is None


def test_output_access_forms():
    logits = torch.zeros(1, 2, 4)
    out = CausalLMOutput(logits=logits)
    assert out.logits is out[0] is out["logits"] is out.to_tuple()[0]
    assert out.to_tuple() == (logits,) and list(out) == ["logits"] and "loss" not in out
    with pytest.raises(KeyError, match="'loss' is not set"):
        out["loss"]
    loss = torch.tensor(1.0)
    with_loss = CausalLMOutput(loss=loss, logits=logits)
    assert with_loss[0] is loss and with_loss[1] is logits and with_loss[-1] is logits  # None fields skipped
    bert = BertModel({"vocab_size": 20, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                      "num_attention_heads": 2})
    enc = bert(torch.tensor([[1, 2, 3]]))
    assert isinstance(enc, EncoderOutput)
    assert enc[0] is enc.last_hidden_state is enc["last_hidden_state"] and enc[1] is enc.pooler_output
    assert len(enc.to_tuple()) == 2


def test_past_key_values_and_use_cache(model):
    ids = PROMPTS[:1]
    full = model(ids).logits
    first = model(ids[:, :3], use_cache=True)
    assert type(first.past_key_values).__name__ == "DynamicCache"
    assert first.past_key_values.get_seq_length() == 3
    rest = model(ids[:, 3:], past_key_values=first.past_key_values)
    assert rest.past_key_values is first.past_key_values
    torch.testing.assert_close(rest.logits, full[:, 3:])
    assert model(ids).past_key_values is None
    assert model(ids, past_key_values=model.make_cache(), use_cache=False).past_key_values is None


def test_device_dtype_and_generation_config(model, tiny_checkpoint):
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (1, 2)  # from the file
    bare = kernelhub.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    assert bare.dtype == torch.bfloat16 and bare.generation_config.eos_token_id is None


def test_bad_generation_config_is_a_config_error(tmp_path, tiny_checkpoint):
    import shutil

    shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "generation_config.json").write_text('{"eos_token_id": "2"}')
    with pytest.raises(kernelhub.ConfigError, match="generation_config.json: 'eos_token_id' is '2'"):
        kernelhub.from_pretrained(tmp_path / "ckpt")


# -- from_pretrained ----------------------------------------------------------------------

def test_torch_dtype_is_a_deprecated_alias(tiny_checkpoint):
    with pytest.warns(DeprecationWarning, match="torch_dtype is deprecated; use dtype"):
        model = kernelhub.from_pretrained(tiny_checkpoint, torch_dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not both"):
        kernelhub.from_pretrained(tiny_checkpoint, dtype="float32", torch_dtype="float32")


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, torch.device("cpu"), "auto"],
                         ids=["str", "dict", "device", "auto"])
def test_single_device_maps(tiny_checkpoint, device_map):
    expected = "cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu"
    assert kernelhub.from_pretrained(tiny_checkpoint, device_map=device_map).device.type == expected


def test_multi_device_maps_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"several devices.*Supported: \"auto\", \"cpu\", \"cuda\""):
        kernelhub.from_pretrained(tiny_checkpoint, device_map={"model.layers.0": "cpu", "lm_head": "cpu"})
    with pytest.raises(ValueError, match="'sequential' is not a device"):
        kernelhub.from_pretrained(tiny_checkpoint, device_map="sequential")
    with pytest.raises(ValueError, match="not both"):
        kernelhub.from_pretrained(tiny_checkpoint, device="cpu", device_map="cpu")


# -- generate -----------------------------------------------------------------------------

def test_greedy_and_eos_defaults_follow_transformers(model, reference):
    ids = PROMPTS[:1]
    # eos 2 comes from generation_config.json, on both sides
    assert model.generate(ids, max_new_tokens=12).tolist() == theirs(reference, ids, max_new_tokens=12).tolist()


def test_eos_token_id_int_and_list(model):
    ids = PROMPTS[:1]
    free = model.generate(ids, max_new_tokens=10, eos_token_id=None)[0, 5:].tolist()
    stop = free[3]
    cut = free.index(stop) + 1
    assert model.generate(ids, max_new_tokens=10, eos_token_id=stop)[0, 5:].tolist() == free[:cut]
    unused = next(t for t in range(64) if t not in free)
    assert model.generate(ids, max_new_tokens=10, eos_token_id=[unused, stop])[0, 5:].tolist() == free[:cut]


def test_pad_token_id_fills_finished_rows(model, reference):
    free = model.generate(PROMPTS, max_new_tokens=8, eos_token_id=None)[:, 5:].tolist()
    # an eos that the first row reaches before the second does
    stop = next(t for t in free[0] if free[0].index(t) < (free[1].index(t) if t in free[1] else 99))
    ours = model.generate(PROMPTS, max_new_tokens=8, eos_token_id=stop, pad_token_id=63)
    cut = free[0].index(stop) + 1
    assert ours[0, 5 + cut:].tolist() and set(ours[0, 5 + cut:].tolist()) == {63}
    assert ours.tolist() == theirs(reference, PROMPTS, max_new_tokens=8, eos_token_id=stop, pad_token_id=63).tolist()


def test_min_new_tokens_bans_eos(model, reference):
    ids = PROMPTS[:1]
    first = model.generate(ids, max_new_tokens=1, eos_token_id=None)[0, -1].item()
    assert model.generate(ids, max_new_tokens=6, eos_token_id=first).shape[1] == 6
    held = model.generate(ids, max_new_tokens=6, eos_token_id=first, min_new_tokens=3)
    assert held.shape[1] >= 8 and held[0, 5].item() != first
    assert held.tolist() == theirs(reference, ids, max_new_tokens=6, eos_token_id=first, min_new_tokens=3,
                                   pad_token_id=0).tolist()


def test_max_length_counts_the_prompt(model):
    assert model.generate(PROMPTS[:1], max_length=8, eos_token_id=None).shape == (1, 8)
    assert model.generate(PROMPTS[:1], max_length=8, max_new_tokens=2, eos_token_id=None).shape == (1, 7)
    with pytest.raises(ValueError, match="max_length=5 leaves no room after the 5-token prompt"):
        model.generate(PROMPTS[:1], max_length=5)


def test_repetition_penalty_matches_transformers(model, reference):
    ids = PROMPTS[:1]
    plain = model.generate(ids, max_new_tokens=12, eos_token_id=None)
    penalised = model.generate(ids, max_new_tokens=12, eos_token_id=None, repetition_penalty=1.8)
    assert penalised.tolist() != plain.tolist()
    assert penalised.tolist() == theirs(reference, ids, max_new_tokens=12, repetition_penalty=1.8,
                                        eos_token_id=None, pad_token_id=0).tolist()


def test_stop_strings_need_a_tokenizer_and_stop(model):
    ids = PROMPTS[:1]
    free = model.generate(ids, max_new_tokens=10, eos_token_id=None)[0, 5:].tolist()
    target = free[4]
    cut = free.index(target) + 1
    out = model.generate(ids, max_new_tokens=10, eos_token_id=None, stop_strings=[f"w{target} "],
                         tokenizer=WordTokenizer())
    assert out[0, 5:].tolist() == free[:cut]
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        model.generate(ids, stop_strings="w1")


def test_text_streamer_prints_the_generated_text(model):
    ids = PROMPTS[:1]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        out = model.generate(ids, max_new_tokens=6, eos_token_id=None,
                             streamer=transformers.TextStreamer(WordTokenizer(), skip_prompt=True))
    assert captured.getvalue() == WordTokenizer().decode(out[0, 5:]) + "\n"


def test_return_dict_in_generate_with_scores(model, reference):
    ids = PROMPTS[:1]
    out = model.generate(ids, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True,
                         output_scores=True, repetition_penalty=1.3)
    assert out.sequences.tolist() == out[0].tolist()
    assert [s.argmax(-1).item() for s in out.scores] == out.sequences[0, 5:].tolist()
    ref = theirs(reference, ids, max_new_tokens=4, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
                 output_scores=True, repetition_penalty=1.3)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert model.generate(ids, max_new_tokens=2, return_dict_in_generate=True).scores is None


def test_generation_config_gives_the_defaults(model):
    ids = PROMPTS[:1]
    free = model.generate(ids, max_new_tokens=8, eos_token_id=None)[0, 5:].tolist()
    saved = model.generation_config.eos_token_id, model.generation_config.max_new_tokens
    try:
        model.generation_config.eos_token_id, model.generation_config.max_new_tokens = [free[2]], 7
        assert model.generate(ids)[0, 5:].tolist() == free[:free.index(free[2]) + 1]
        assert model.generate(ids, eos_token_id=None).shape[1] == 5 + 7  # an explicit None wins
    finally:
        model.generation_config.eos_token_id, model.generation_config.max_new_tokens = saved


def test_unknown_generate_keyword_lists_the_supported_ones(model):
    with pytest.raises(kernelhub.SamplingError, match=r"unknown generate options \['typical_p'\]; valid: ") as info:
        model.generate(PROMPTS[:1], typical_p=0.9)
    valid = str(info.value).split("valid: ")[1].split(", ")
    assert {"streamer", "stop_strings", "repetition_penalty", "return_dict_in_generate", "tokenizer"} <= set(valid)


def test_sampled_generation_is_reproducible_with_a_seed(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = model.generate(PROMPTS, max_new_tokens=5, do_sample=True, seed=3, eos_token_id=None)
    assert a.tolist() == model.generate(PROMPTS, max_new_tokens=5, do_sample=True, seed=3,
                                        eos_token_id=None).tolist()


def test_generation_config_survives_save_and_reload_and_batching_follows_it(model, tmp_path):
    ids = PROMPTS[:1]
    free = model.generate(ids, max_new_tokens=8, eos_token_id=None)[0, 5:].tolist()
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [free[2]]
        model.save_pretrained(tmp_path / "saved")
    finally:
        model.generation_config.eos_token_id = saved
    reloaded = kernelhub.from_pretrained(tmp_path / "saved")
    assert list(reloaded.generation_config.eos_token_id) == [free[2]]
    stopped = reloaded.generate(ids, max_new_tokens=8)[0, 5:].tolist()
    assert stopped == free[:free.index(free[2]) + 1]
    batch = reloaded.generate_batch([ids[0].tolist()], max_new_tokens=8)
    assert batch[0].tokens == stopped and batch[0].finish_reason == "eos"
    with pytest.raises(kernelhub.SamplingError, match="continuous batching does not support max_length=9"):
        reloaded.generate_batch([ids[0].tolist()], max_new_tokens=8, max_length=9)


def test_sampling_params_override_the_generation_config_field_by_field(model):
    from kernelhub import SamplingParams

    ids = PROMPTS[:1]
    free = model.generate(ids, max_new_tokens=8, eos_token_id=None)[0, 5:].tolist()
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [free[2]]
        stopped = free[:free.index(free[2]) + 1]
        assert model.generate(ids, sampling=SamplingParams(max_new_tokens=8))[0, 5:].tolist() == stopped
        assert model.generate_batch([ids[0].tolist()], sampling=SamplingParams(max_new_tokens=8))[0].tokens == stopped
    finally:
        model.generation_config.eos_token_id = saved
    # max_new_tokens set in `sampling` wins over max_length, as in transformers
    assert model.generate(ids, sampling=SamplingParams(max_new_tokens=2, max_length=50),
                          eos_token_id=None).shape == (1, 7)


def test_an_eos_id_outside_the_vocabulary_is_ignored_by_min_new_tokens(model):
    out = model.generate(PROMPTS[:1], eos_token_id=10_000, min_new_tokens=2, max_new_tokens=3)
    assert out.shape == (1, 8)
