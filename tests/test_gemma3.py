"""Gemma 3 (text) against transformers 5.22.2: a random checkpoint it wrote (sliding and full layers, local and
global rope, q/k norms) under eager and sdpa, and the real Gemma 3 270M Q4_K_M GGUF file, dequantised, against
transformers' own GGUF load of the same file (config, tokenizer, logits, greedy tokens); loaded packed (the
default), its plan shows the Q4_K, Q5_0, Q6_K and Q8_0 kernels and it gives the dequantised greedy tokens."""

import copy

import pytest
import torch

import kernelhub
from checkpoints import FAMILY_CONFIGS, write_family_checkpoint
from kernelhub.declare.errors import ConfigError
from kernelhub.models.gemma3 import Gemma3Config
from kernelhub.testing.samples import gemma3_gguf

VOCAB = FAMILY_CONFIGS["gemma3_text"]["vocab_size"]
WINDOW = FAMILY_CONFIGS["gemma3_text"]["sliding_window"]
BACKENDS = ["eager", "sdpa"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma3")
    return path, write_family_checkpoint("gemma3_text", path)


@pytest.fixture(scope="module")
def eager_model(checkpoint):
    return kernelhub.from_pretrained(checkpoint[0], attn_implementation="eager", dtype="float32")


def padded_batch(seed=1, length=14):
    """Two rows longer than three sliding windows, the second left-padded by 5."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :5] = 0
    return ids, mask


def test_checkpoint_has_sliding_and_full_layers(eager_model):
    assert eager_model.config.layer_types == ("sliding_attention", "full_attention") * 2
    windows = [layer.self_attn.attn.sliding_window for layer in eager_model.model.layers]
    assert windows == [WINDOW, None, WINDOW, None]


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_transformers(checkpoint, backend):
    path, reference = checkpoint
    model = kernelhub.from_pretrained(path, attn_implementation=backend, dtype="float32")
    assert {e.chosen for e in model.binding.entries if e.kind == "attention"} == {backend}
    ids, mask = padded_batch()
    assert ids.shape[1] > 3 * WINDOW
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-5


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_tokens_match_transformers(checkpoint, eager_model, cache):
    _, reference = checkpoint
    ids, mask = padded_batch(seed=2)
    theirs = reference.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
    ours = eager_model.generate(ids, attention_mask=mask, max_new_tokens=16, cache=cache, eos_token_id=None)
    assert ours.tolist() == theirs.tolist()


def test_local_rope_qk_norms_and_window_matter(eager_model):
    """Each Gemma 3 detail changes the logits at this size (a test that cannot fail is none)."""
    ids, _ = padded_batch()
    with torch.no_grad():
        base = eager_model(ids).logits
        variant = copy.deepcopy(eager_model)
        tables = variant.model.rotary_emb.by_type
        tables["sliding_attention"] = tables["full_attention"]  # global rope on the sliding layers too
        assert (variant(ids).logits - base).abs().max() > 1e-2
        variant = copy.deepcopy(eager_model)
        for layer in variant.model.layers:
            layer.self_attn.q_norm.weight.zero_()
        assert (variant(ids).logits - base).abs().max() > 1e-2
        variant = copy.deepcopy(eager_model)
        variant.model.cfg.sliding_window = ids.shape[1]  # sliding layers that see every token
        assert (variant(ids).logits - base).abs().max() > 1e-2


def test_save_pretrained_loads_in_transformers(eager_model, tmp_path):
    import transformers

    eager_model.save_pretrained(tmp_path)
    theirs = transformers.Gemma3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, _ = padded_batch(seed=3)
    with torch.no_grad():
        assert (eager_model(ids).logits - theirs(ids).logits).abs().max() <= 1e-5


def test_config_defaults_and_v4_fields_as_transformers_reads_them():
    import transformers

    fields = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=7, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=8, sliding_window_pattern=3, rope_theta=5000.0,
                  rope_local_base_freq=50.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    theirs = transformers.Gemma3TextConfig(**fields)
    ours = Gemma3Config.from_dict({"model_type": "gemma3_text", **fields}, "config.json")
    assert list(ours.layer_types) == theirs.layer_types
    for layer_type, params in theirs.rope_parameters.items():
        assert {k: params[k] for k in ("rope_type", "rope_theta", "factor") if k in params} == \
            {k: ours.rope[layer_type][k] for k in ("rope_type", "rope_theta", "factor") if k in ours.rope[layer_type]}
    assert ours.rope["full_attention"]["factor"] == 4.0 and "factor" not in ours.rope["sliding_attention"]
    default = Gemma3Config.from_dict({k: v for k, v in fields.items() if k != "sliding_window_pattern"})
    assert default.layer_types == tuple(transformers.Gemma3TextConfig(**fields | {"sliding_window_pattern": 6})
                                        .layer_types)
    assert (default.sliding_window, default.query_pre_attn_scalar, default.final_logit_softcapping) == (4096, 256, None)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gemma3"}, "model_type 'gemma3' is the multimodal Gemma 3"),
    ({"use_bidirectional_attention": True}, "'use_bidirectional_attention' is True"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "'rope_parameters' is"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn2"}}}, "(rope_parameters.full_attention): 'rope_type'"),
    ({"sliding_window": None}, "'sliding_window' is None"),
])
def test_bad_configs_name_the_field(change, message):
    base = {"model_type": "gemma3_text", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2}
    with pytest.raises(ConfigError) as err:
        Gemma3Config.from_dict({**base, **change}, "config.json")
    assert message in str(err.value)


# -- the real Gemma 3 270M GGUF ---------------------------------------------------------

def test_gguf_metadata_as_llama_cpp_reads_it():
    from kernelhub.checkpoint.gguf import gemma3_config

    sizes = {"num_hidden_layers": 62, "hidden_size": 5376, "num_attention_heads": 32, "head_dim": 128}
    meta = {"gemma3.attention.sliding_window": 1024, "gemma3.rope.freq_base": 1e6,
            "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}
    cfg = gemma3_config(meta, sizes, "GGUF file x.gguf")
    assert cfg["query_pre_attn_scalar"] == 168  # the 27B: hidden / heads, not head_dim
    assert cfg["rope_parameters"]["full_attention"] == {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0}
    assert cfg["rope_parameters"]["sliding_attention"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["layer_types"].count("full_attention") == 10 and cfg["layer_types"][5] == "full_attention"
    pattern = [True, False] * 31
    cfg = gemma3_config({**meta, "gemma3.attention.sliding_window_pattern": pattern}, sizes, "GGUF file x.gguf")
    assert cfg["layer_types"][:2] == ["sliding_attention", "full_attention"]
    for bad, key in [({"gemma3.attention.sliding_window_pattern": [True]}, "sliding_window_pattern"),
                     ({"gemma3.rope.scaling.type": "yarn"}, "gemma3.rope.scaling.type"),
                     ({"gemma3.attention.sliding_window": None}, "gemma3.attention.sliding_window")]:
        with pytest.raises(ConfigError, match=f"GGUF file x.gguf.*{key}"):
            gemma3_config({**meta, **bad}, sizes, "GGUF file x.gguf")


# The file carries no chat template (transformers' tokenizer has none either): Gemma's turn format.
TURNS = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
         "\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
         "{% endif %}")
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]
STRINGS = [
    "Hello world", " Hello  world", "a  b   c    d", "trailing   ", "  \n  ", "\t\ttabs\n\nnewlines",
    "1234567 + 89 = 1234656", "héllo wörld ñ 日本語 🤗", "emoji 😀😃😄 \U0001fae8", "def f(x):\n    return x**2\n",
    "<start_of_turn>user\nhi<end_of_turn>", "<bos><eos> and more", "don't can't I'm", "x" * 50,
]


@pytest.fixture(scope="module")
def private_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kernelhub-cache"))


@pytest.fixture(scope="module")
def gguf(private_cache):
    """Ours, dequantised and converted into a private cache (the conversion itself is under test), and
    transformers'."""
    import transformers

    path = gemma3_gguf()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERNELHUB_CACHE", private_cache)
        model = kernelhub.from_pretrained(path, dtype=torch.float32, dequantize=True)
        tok = kernelhub.load_tokenizer(path, model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    # the class AutoTokenizer picks for this file, named: AutoTokenizer would parse the whole file again (~20 s)
    ref_tok = transformers.GemmaTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok, reference.eval(), ref_tok


def test_gguf_config_matches_transformers(gguf):
    model, _, reference, _ = gguf
    ours, theirs = model.config, reference.config
    assert ours.layer_types == tuple(theirs.layer_types) and ours.layer_types.count("full_attention") == 3
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "sliding_window", "query_pre_attn_scalar", "rms_norm_eps",
                 "tie_word_embeddings"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for layer_type in ("full_attention", "sliding_attention"):
        assert ours.rope[layer_type]["rope_theta"] == theirs.rope_parameters[layer_type]["rope_theta"]
    # llama.cpp stores Gemma's norms as 1 + weight: both loaders take the one off
    q_norm = model.model.layers[0].self_attn.q_norm.weight
    assert torch.equal(q_norm, reference.model.layers[0].self_attn.q_norm.weight)


def test_gguf_tokenizer_matches_transformers(gguf):
    _, tok, _, ref_tok = gguf
    assert tok.chat_template is None and ref_tok.chat_template is None
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.padding_side) == ("<bos>", "<eos>", "<pad>", "left")
    for text in STRINGS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref_tok(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(ids) == ref_tok.decode(ids) == text
        # the file says add_bos_token (llama.cpp and Gemma's own tokenizer put <bos> first; transformers' GGUF
        # tokenizer does not)
        assert tok.encode(text) == [tok.bos_token_id] + ids


def test_gguf_logits_and_greedy_tokens_match_transformers(gguf):
    """Both chat prompts in one left-padded batch (one generate per side: the 262k-row head dominates decoding)."""
    model, tok, reference, ref_tok = gguf
    chats = [[{"role": "user", "content": question}] for question in QUESTIONS]
    batch = tok.apply_chat_template(chats, add_generation_prompt=True, chat_template=TURNS, padding=True,
                                    return_tensors="pt")
    theirs_batch = ref_tok.apply_chat_template(chats, add_generation_prompt=True, chat_template=TURNS, padding=True,
                                               return_dict=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.tolist() == theirs_batch["input_ids"].tolist()
    assert not [e for e in model.binding if "Quantized" in e.source] and not model.binding.notes
    assert mask.tolist() == theirs_batch["attention_mask"].tolist()
    assert not mask.all() and mask[:, -1].all()  # the shorter prompt is padded on the left
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-4 * theirs[valid].abs().max()
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                  eos_token_id=None, pad_token_id=tok.pad_token_id)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None)
    assert generated.tolist() == expected.tolist()


@pytest.fixture(scope="module")
def packed(gguf, private_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERNELHUB_CACHE", private_cache)  # the conversion the dequantised load made
        return kernelhub.from_pretrained(gemma3_gguf())


def test_packed_plan_shows_each_ggml_type_and_what_stays_dequantised(packed):
    plan = packed.binding
    kernels = {e.note.split(";")[0] for e in plan if e.chosen == "gguf" and "QuantizedLinear" in e.source}
    assert kernels == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}  # o / down, q-k-v / gate-up, down, the tied head
    assert plan["model.embed_tokens"].note.startswith("Q8_0") and plan["lm_head"].note.startswith("Q8_0")
    assert packed.lm_head.qweight is packed.model.embed_tokens.qweight  # the 262k-row table, held once
    # half the layers store v in Q8_0 beside Q5_0 q/k: their fused q/k/v keeps one packed part per type
    assert [plan[f"model.layers.0.self_attn.qkv_proj.parts.{i}"].note.split(";")[0] for i in range(3)] == [
        "Q5_0", "Q5_0", "Q8_0"]
    assert not plan.notes and not [e for e in plan if e.kind == "layer" and e.source == "model (Linear)"]
    assert str(kernelhub.explain(gemma3_gguf())) == str(plan)


def test_packed_greedy_tokens_equal_dequantised(gguf, packed):
    """The scaled embedding (sqrt(hidden_size) times the packed rows), the packed head and the mixed
    layers: the same 16 greedy tokens on both chat prompts as the float weights."""
    model, tok, _, _ = gguf
    chats = [[{"role": "user", "content": question}] for question in QUESTIONS]
    batch = tok.apply_chat_template(chats, add_generation_prompt=True, chat_template=TURNS, padding=True,
                                    return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ours, theirs = packed(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-4 * theirs[valid].abs().max()
    generated = packed.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None)
    assert generated.tolist() == model.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None).tolist()
