"""Damaged or mismatched real-world inputs: each a clear error naming the file and the problem."""

import shutil

import pytest
import torch

import kernelhub
from gguf_files import write_tiny_gguf
from kernelhub.testing.samples import minilm_dir


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path / "cache"))


def test_tiny_gguf_loads_and_generates(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = kernelhub.from_pretrained(path, attn_implementation="eager")
    assert model.config.num_hidden_layers == 1 and model.config.tie_word_embeddings
    tok = kernelhub.load_tokenizer(path, model=model)
    assert tok.encode("abc ab") == [7, 4, 3]  # "abc", "Ġ", "ab": merges applied, specials kept whole
    assert tok.encode("<|endoftext|>a") == [0, 1]
    assert model.generate(torch.tensor([tok.encode("ab")]), max_new_tokens=3).shape == (1, 4)


def test_truncated_gguf_names_the_file(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(kernelhub.CheckpointError, match=r"cannot read GGUF file .*cut\.gguf.*truncated"):
        kernelhub.from_pretrained(tmp_path / "cut.gguf")


def test_gguf_of_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(kernelhub.CheckpointError,
                       match="architecture 'gpt2' is not supported; supported: llama, qwen2"):
        kernelhub.from_pretrained(path)


def test_gguf_without_tokenizer(tmp_path):
    path = write_tiny_gguf(tmp_path / "notok.gguf", tokenizer=False)
    with pytest.raises(kernelhub.CheckpointError, match="GGUF file has no tokenizer"):
        kernelhub.from_pretrained(path)


def test_gguf_vocab_and_embedding_disagree(tmp_path):
    path = write_tiny_gguf(tmp_path / "mismatch.gguf", vocab_rows=12)
    with pytest.raises(kernelhub.CheckpointError, match="embedding has 12 rows but the vocabulary has 8 tokens"):
        kernelhub.from_pretrained(path)


def test_missing_tokenizer_in_a_directory(tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm_dir() / name, tmp_path / name)
    kernelhub.from_pretrained(tmp_path)  # the model itself loads
    with pytest.raises(kernelhub.CheckpointError, match="no tokenizer at .*expected tokenizer.json"):
        kernelhub.load_tokenizer(tmp_path)


def test_tokenizer_that_does_not_fit_the_model(tmp_path):
    model = kernelhub.from_pretrained(write_tiny_gguf(tmp_path / "tiny.gguf"))
    with pytest.raises(kernelhub.CheckpointError, match="30522 tokens but the model's embedding has 8 rows"):
        kernelhub.load_tokenizer(minilm_dir(), model=model)


def test_missing_gguf_file(tmp_path):
    with pytest.raises(kernelhub.CheckpointError, match="GGUF file .*nope.gguf' does not exist"):
        kernelhub.from_pretrained(tmp_path / "nope.gguf")


def test_explain_on_gguf_reads_metadata_only(tmp_path, monkeypatch):
    import kernelhub.checkpoint.gguf as gguf_module

    def no_tensors(*a, **k):
        raise AssertionError("explain must not dequantise")

    monkeypatch.setattr(gguf_module, "read_tensors", no_tensors)
    plan = kernelhub.explain(write_tiny_gguf(tmp_path / "tiny.gguf"), attn_implementation="sdpa")
    assert plan.chosen() == {"sdpa"}
    assert not (tmp_path / "cache").exists()
