"""Strict checkpoint files: config.json, the safetensors index and GGUF metadata, field by field.

Every malformed file fails with one `ConfigError`/`CheckpointError` naming the file and the
field, before any tensor is read or any module built; shards never leave the checkpoint.
"""

import json
import shutil
import time

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

import kernelhub
import kernelhub.models.bert as bert_module
import kernelhub.checkpoint.hf_layout as checkpoint_module
import kernelhub.checkpoint.gguf as gguf_module
import kernelhub.models.llama as llama_module
from gguf_files import write_tiny_gguf
from kernelhub.declare.errors import CheckpointError, ConfigError

BERT = {"model_type": "bert", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def guarded(monkeypatch):
    """Fail the test if a tensor is read or a model built; record every weight file whose header is opened."""
    opened = []

    def forbidden(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"{what} must not happen for a malformed checkpoint")
        return fail

    real_safe_open = checkpoint_module.safe_open

    def recording_safe_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_safe_open(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "load_file", forbidden("reading tensors"))
    monkeypatch.setattr(checkpoint_module, "safe_open", recording_safe_open)
    monkeypatch.setattr(llama_module, "LlamaModel", forbidden("building a llama model"))
    monkeypatch.setattr(bert_module, "BertEmbeddings", forbidden("building a bert model"))
    monkeypatch.setattr(gguf_module, "read_tensors", forbidden("dequantising GGUF tensors"))
    return opened


def registry_snapshot():
    reg = kernelhub.get_registry()
    return list(reg._backends.items()), dict(reg._aliases), dict(reg.architectures)


def copy_checkpoint(tiny_checkpoint, path, **changes):
    """A private copy of the tiny checkpoint with `changes` applied to its config.json (None deletes)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(tiny_checkpoint / "model.safetensors", path / "model.safetensors")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return path


CONFIG_CASES = [
    # (config changes, field the message names, phrase the message contains)
    ({"num_hidden_layers": "4"}, "num_hidden_layers", "'4' (str)"),
    ({"hidden_size": True}, "hidden_size", "True (bool)"),
    ({"vocab_size": 256.0}, "vocab_size", "256.0 (float)"),
    ({"intermediate_size": -128}, "intermediate_size", "-128 (int)"),
    ({"num_attention_heads": 0}, "num_attention_heads", "allowed: a positive int"),
    ({"num_key_value_heads": 3}, "num_key_value_heads", "not a multiple of"),
    ({"hidden_size": 66}, "num_attention_heads", "'hidden_size' is 66, not a multiple of"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types", "a list of num_hidden_layers (4) items"),
    ({"layer_types": ["full_attention"] * 3 + ["chunked_attention"]}, "layer_types[3]", "'chunked_attention' (str)"),
    ({"layer_types": "full_attention"}, "layer_types", "(str)"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps", "a number > 0"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps", "nan (float)"),
    ({"rope_theta": "10000"}, "rope_theta", "'10000' (str)"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings", "true or false"),
    ({"attention_bias": 1}, "attention_bias", "1 (int)"),
    ({"sliding_window": 0}, "sliding_window", "a positive int or null"),
    ({"model_type": "qwen2", "use_sliding_window": "yes"}, "use_sliding_window", "'yes' (str)"),
    ({"attention_dropout": 1.5}, "attention_dropout", "[0, 1)"),
    ({"head_dim": 15}, "head_dim", "an even positive int"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0}}, "factor", "(rope_parameters) lacks"),
    ({"rope_parameters": {"rope_type": "longrope"}}, "rope_type", "'default', 'linear', 'llama3', 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act", "'silu'"),
    ({"vocab_size": None}, "vocab_size", "lacks"),
    ({"vocab_size": 300}, "vocab_size", "'model.embed_tokens.weight'"),
    ({"intermediate_size": 96}, "intermediate_size", "'model.layers.0.mlp.gate_proj.weight'"),
    ({"num_hidden_layers": 2}, "num_hidden_layers", "hold 4 layers"),
    ({"kernelhub": ["sdpa"]}, "kernelhub", "allowed: an object"),
]


@pytest.mark.parametrize("changes, field, phrase", CONFIG_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CONFIG_CASES)])
def test_malformed_config_is_refused_before_anything_is_read(tiny_checkpoint, tmp_path, guarded, changes, field,
                                                             phrase):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt", **changes)
    before = registry_snapshot()
    with pytest.raises(ConfigError) as info:
        kernelhub.from_pretrained(path, attn_implementation="eager")
    message = str(info.value)
    assert repr(field) in message and str(path / "config.json") in message and phrase in message, message
    assert "\n" not in message
    assert registry_snapshot() == before
    assert str(path / "model.safetensors") not in guarded or field in ("vocab_size", "intermediate_size",
                                                                       "num_hidden_layers", "kernelhub")


@pytest.mark.parametrize("changes, field", [({"num_hidden_layers": 0}, "num_hidden_layers"),
                                            ({"num_key_value_heads": False}, "num_key_value_heads"),
                                            ({"rms_norm_eps": 0}, "rms_norm_eps")])
def test_explain_needs_no_weights_but_checks_types(tiny_checkpoint, tmp_path, monkeypatch, changes, field):
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", good / "config.json")
    assert kernelhub.explain(good, attn_implementation="sdpa").chosen() == {"sdpa"}  # no weights present
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "bad", **changes)
    (path / "model.safetensors").unlink()
    monkeypatch.setattr(llama_module, "LlamaModel", None)  # building would fail with a TypeError
    with pytest.raises(ConfigError) as info:
        kernelhub.explain(path)
    assert repr(field) in str(info.value) and str(path / "config.json") in str(info.value)


def test_absurd_layer_count_fails_fast_against_the_weights(tiny_checkpoint, tmp_path, guarded):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt", num_hidden_layers=10_000_000)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        kernelhub.from_pretrained(path)
    assert time.perf_counter() - start < 2
    message = str(info.value)
    assert "'num_hidden_layers' is 10000000" in message and "hold 4 layers" in message
    assert str(path / "config.json") in message


def test_config_that_is_not_an_object(tmp_path, guarded):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config\.json: the config is \[1, 2\] \(list\); allowed: a JSON object"):
        kernelhub.from_pretrained(tmp_path)


@pytest.mark.parametrize("changes, field", [({"num_attention_heads": 3}, "num_attention_heads"),
                                            ({"hidden_act": "relu"}, "hidden_act"),
                                            ({"layer_norm_eps": -1.0}, "layer_norm_eps"),
                                            ({"max_position_embeddings": "512"}, "max_position_embeddings"),
                                            ({"type_vocab_size": 2.0}, "type_vocab_size")])
def test_malformed_bert_config(tmp_path, guarded, changes, field):
    (tmp_path / "config.json").write_text(json.dumps({**BERT, **changes}))
    for load in (kernelhub.from_pretrained, kernelhub.explain):  # no weights needed to refuse a config
        with pytest.raises(ConfigError) as info:
            load(tmp_path)
        assert repr(field) in str(info.value) and str(tmp_path / "config.json") in str(info.value)


# -- the safetensors index ---------------------------------------------------------------

def sharded(tiny_checkpoint, path):
    """The tiny checkpoint as two shards with a model.safetensors.index.json; returns (path, weight_map)."""
    path.mkdir(parents=True)
    shutil.copy(tiny_checkpoint / "config.json", path / "config.json")
    state = load_file(tiny_checkpoint / "model.safetensors")
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, path / shard)
        weight_map.update(dict.fromkeys(part, shard))
    write_index(path, {"metadata": {}, "weight_map": weight_map})
    return path, weight_map


def write_index(path, index):
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_checkpoint_loads_like_the_single_file(tiny_checkpoint, tmp_path):
    path, _ = sharded(tiny_checkpoint, tmp_path / "ckpt")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        expected = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")(ids).logits
        got = kernelhub.from_pretrained(path, attn_implementation="eager")(ids).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def elsewhere(tmp_path, tiny_checkpoint):
    """A real, loadable safetensors file outside the checkpoint directory."""
    file = tmp_path / "elsewhere.safetensors"
    save_file(load_file(tiny_checkpoint / "model.safetensors"), file)
    return file


def redirect(weight_map, shard):
    """The index with its first tensor moved to `shard`."""
    first = sorted(weight_map)[0]
    return {"weight_map": {**weight_map, first: shard}}, first


def test_index_naming_a_shard_outside_the_directory_is_not_read(tiny_checkpoint, tmp_path, guarded):
    path, weight_map = sharded(tiny_checkpoint, tmp_path / "a" / "ckpt")
    outside = elsewhere(tmp_path, tiny_checkpoint)
    assert (path / "../../elsewhere.safetensors").resolve() == outside.resolve()
    index, tensor = redirect(weight_map, "../../elsewhere.safetensors")
    write_index(path, index)
    for load in (kernelhub.from_pretrained, checkpoint_module.read_state_dict):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert str(path / "model.safetensors.index.json") in message and repr(tensor) in message
        assert "'../../elsewhere.safetensors'" in message and "climbs out with '..'" in message
    assert not any("elsewhere" in file for file in guarded)


INDEX_CASES = [
    # (index file contents, or a function of (tmp_path, weight_map) giving them; phrase the message contains)
    ([{"weight_map": {}}], "is not a valid safetensors index: it is [{'weight_map': {}}] (list)"),
    ({"weight_map": [["model.norm.weight", "model-00001-of-00002.safetensors"]]}, "'weight_map' is [["),
    ({"metadata": {}}, "'weight_map' is None (NoneType)"),
    ({"weight_map": {}}, "a non-empty object"),
    ({"weight_map": {"model.norm.weight": 1}}, "tensor 'model.norm.weight' names shard 1 (int)"),
    (lambda tmp_path, wm: redirect(wm, str(tmp_path / "elsewhere.safetensors"))[0], "it is an absolute path"),
    (lambda tmp_path, wm: redirect(wm, "shards\\..\\..\\elsewhere.safetensors")[0], "not a plain relative file"),
    (lambda tmp_path, wm: redirect(wm, "missing.safetensors")[0], "lists shards that do not exist: missing"),
]


@pytest.mark.parametrize("index, phrase", INDEX_CASES, ids=[f"index-{i}" for i in range(len(INDEX_CASES))])
def test_malformed_index_is_refused(tiny_checkpoint, tmp_path, guarded, index, phrase):
    path, weight_map = sharded(tiny_checkpoint, tmp_path / "ckpt")
    elsewhere(tmp_path, tiny_checkpoint)
    write_index(path, index(tmp_path, weight_map) if callable(index) else index)
    before = registry_snapshot()
    with pytest.raises(CheckpointError) as info:
        kernelhub.from_pretrained(path)
    message = str(info.value)
    assert str(path / "model.safetensors.index.json") in message and phrase in message, message
    assert guarded == [] and registry_snapshot() == before


def test_index_that_is_not_json(tiny_checkpoint, tmp_path, guarded):
    path, _ = sharded(tiny_checkpoint, tmp_path / "ckpt")
    (path / "model.safetensors.index.json").write_text("{nope")
    with pytest.raises(CheckpointError, match=r"index\.json \(a safetensors index\) is not valid JSON"):
        kernelhub.from_pretrained(path)


def test_shard_symlink_escaping_the_directory_is_refused(tiny_checkpoint, tmp_path, guarded):
    path, weight_map = sharded(tiny_checkpoint, tmp_path / "ckpt")
    outside = elsewhere(tmp_path, tiny_checkpoint)
    (path / "innocent.safetensors").symlink_to(outside)
    index, tensor = redirect(weight_map, "innocent.safetensors")
    write_index(path, index)
    with pytest.raises(CheckpointError) as info:
        kernelhub.from_pretrained(path)
    message = str(info.value)
    assert repr(tensor) in message and "'innocent.safetensors'" in message and "outside the checkpoint" in message
    assert str(path / "model.safetensors.index.json") in message and guarded == []


def test_single_file_symlink_escaping_the_directory_is_refused(tiny_checkpoint, tmp_path, guarded):
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", path / "config.json")
    (path / "model.safetensors").symlink_to(elsewhere(tmp_path, tiny_checkpoint))
    with pytest.raises(CheckpointError, match="model.safetensors, which is refused: its real path .* is outside"):
        kernelhub.from_pretrained(path)
    assert guarded == []


def test_hugging_face_cache_layout_with_blob_symlinks_loads(tiny_checkpoint, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_checkpoint / name, repo / "blobs" / f"blob-{name}")
        (snapshot / name).symlink_to(f"../../blobs/blob-{name}")
    assert kernelhub.from_pretrained(snapshot).config.num_hidden_layers == 4


# -- GGUF metadata -------------------------------------------------------------------------

GGUF_CASES = [
    ("llama.block_count", ("one", gguf.GGUFValueType.STRING), "'one' (str)"),
    ("llama.block_count", (True, gguf.GGUFValueType.BOOL), "True (bool)"),
    ("llama.block_count", (3, gguf.GGUFValueType.UINT32), "hold 1 layers (blk.N)"),
    ("llama.embedding_length", (16.0, gguf.GGUFValueType.FLOAT32), "16.0 (float)"),
    ("llama.attention.head_count", (0, gguf.GGUFValueType.UINT32), "a positive int"),
    ("llama.attention.head_count_kv", (-1, gguf.GGUFValueType.INT32), "-1 (int)"),
    ("llama.attention.head_count_kv", (3, gguf.GGUFValueType.UINT32), "not a multiple of"),
    ("llama.attention.layer_norm_rms_epsilon", (-1e-5, gguf.GGUFValueType.FLOAT32), "a number > 0"),
    ("llama.rope.freq_base", ("10000", gguf.GGUFValueType.STRING), "'10000' (str)"),
    ("tokenizer.ggml.eos_token_id", (-2, gguf.GGUFValueType.INT32), "an int >= 0"),
    ("llama.feed_forward_length", (64, gguf.GGUFValueType.UINT32), "'blk.0.ffn_gate.weight' in this file"),
]


@pytest.mark.parametrize("key, value, phrase", GGUF_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(GGUF_CASES)])
def test_malformed_gguf_metadata(tmp_path, guarded, key, value, phrase):
    path = write_tiny_gguf(tmp_path / "bad.gguf", overrides={key: value})
    for load in (kernelhub.explain, kernelhub.from_pretrained):
        with pytest.raises(ConfigError) as info:
            load(path)
        message = str(info.value)
        assert f"GGUF file {path}" in message and repr(key) in message and phrase in message, message
    assert not (tmp_path / "cache").exists()  # refused before any conversion was written


def test_gguf_conversion_applies_the_model_checks_before_dequantising(tmp_path, guarded):
    odd_head_dim = {"llama.rope.dimension_count": (7, gguf.GGUFValueType.UINT32)}
    path = write_tiny_gguf(tmp_path / "odd.gguf", overrides=odd_head_dim)
    with pytest.raises(ConfigError) as info:
        kernelhub.from_pretrained(path)
    assert f"config derived from GGUF file {path}: 'head_dim' is 7" in str(info.value)
    assert not (tmp_path / "cache").exists()
