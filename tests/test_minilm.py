"""The real all-MiniLM-L6-v2 (BERT) checkpoint: transformers parity and sentence similarity."""

import pytest
import torch

import kernelhub
from kernelhub.models.bert import mean_pool
from kernelhub.testing.samples import minilm_dir

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome.",
             "The stock market fell sharply on Monday.", "Quantum computers use qubits.", "Hi"]


@pytest.fixture(scope="module")
def batch():
    return kernelhub.load_tokenizer(minilm_dir())(SENTENCES, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def reference(batch):
    import transformers

    model = transformers.BertModel.from_pretrained(minilm_dir(), attn_implementation="eager",
                                                   dtype=torch.float32).eval()
    with torch.no_grad():
        return model(**batch).last_hidden_state


def embed(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return hidden, torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def test_tokenizer_pads_a_batch_of_different_lengths(batch):
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 3 and min(lengths) == 3  # "Hi" -> [CLS] hi [SEP]
    assert batch["input_ids"][0, 0].item() == 101  # [CLS]


@pytest.mark.kernelhub_backends
def test_embeddings_match_transformers(attn_backend, batch, reference, assert_bound):
    model = kernelhub.from_pretrained(minilm_dir(), attn_implementation=attn_backend)
    assert_bound(model, "encoder.layer.5.attention.self.attn", attn_backend)
    hidden, _ = embed(model, batch)
    valid = batch["attention_mask"].bool()
    assert (hidden[valid] - reference[valid]).abs().max() <= 1e-5


def test_sentence_similarity(batch):
    _, e = embed(kernelhub.from_pretrained(minilm_dir(), attn_implementation="sdpa"), batch)
    sims = e @ e.T
    assert sims[0, 1].item() == pytest.approx(0.755, abs=0.005)
    unrelated = [sims[i, j].item() for i in range(2, 5) for j in range(i + 1, 5)]
    assert all(abs(s) < 0.15 for s in unrelated), unrelated


def test_layernorm_is_a_declared_layer():
    plan = kernelhub.explain(minilm_dir(), attn_implementation="sdpa")
    layers = {e.path for e in plan if e.kind == "layer"}
    assert "embeddings.LayerNorm" in layers and "encoder.layer.5.output.LayerNorm" in layers
    assert plan["encoder.layer.0.attention.self.attn"].chosen == "sdpa"
