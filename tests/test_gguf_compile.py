"""Compiled decoding with packed GGUF weights: `generate(cache="static", compile=True)` and
`generate_batch(compile=True)` on a model whose projections, embedding and tied output projection
stay in ggml blocks give the eager packed tokens, with one graph per shape bucket (no graph break:
the steps compile with `fullgraph=True`; no recompilation per token, prompt or call).

The model is a tiny GGUF file (hidden 64, one layer, Q8_0 with a Q4_1 down projection and a Q5_0 v
beside Q8_0 q/k, so the fused q/k/v keeps one packed part per type) written with gguf-py, so each
graph costs one small inductor compilation."""

import random

import pytest
import torch
from gguf import GGMLQuantizationType as GGML
from torch._dynamo.utils import counters

import kernelhub
from kernelhub.runtime import compiled_decode
from kernelhub.runtime.compiled_decode import wants_cpp_wrapper
from kernelhub.declare.reference_layers import QuantizedEmbedding, QuantizedLinear
from tests.gguf_files import TOKENS, write_tiny_gguf

VOCAB = TOKENS + [f"t{i}" for i in range(56)]  # 64 tokens: greedy runs that do not cycle at once


@pytest.fixture(scope="module")
def packed_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-packed") / "tiny-q8.gguf"
    return write_tiny_gguf(path, tokens=VOCAB, hidden=64, ggml_type=GGML.Q8_0,
                           types={"blk.0.ffn_down.weight": GGML.Q4_1, "blk.0.attn_v.weight": GGML.Q5_0}, seed=3)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_the_tiny_file_loads_packed_and_tied(packed_gguf):
    model = kernelhub.from_pretrained(packed_gguf)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.qweight is model.model.embed_tokens.qweight
    assert model.binding["model.layers.0.mlp.down_proj"].note.startswith("Q4_1")
    assert model.binding["model.layers.0.self_attn.qkv_proj.parts.2"].note.startswith("Q5_0")
    ids = torch.tensor([[1, 9, 4, 60]])
    with torch.no_grad():  # the packed model computes what its float weights do, to float32 rounding
        ours, theirs = model(ids).logits, kernelhub.from_pretrained(packed_gguf, dequantize=True)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4 * theirs.abs().max().item(), rtol=0)


def test_compiled_generate_on_packed_weights_gives_eager_tokens_and_compiles_once(packed_gguf, monkeypatch):
    monkeypatch.setattr(compiled_decode, "_compiled", {})  # the compiled steps this test builds, alone
    model = kernelhub.from_pretrained(packed_gguf, attn_implementation="sdpa")
    prompts = [[5, 17, 3, 9, 2], [8, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 11, 7]]  # one 64-position bucket
    before = graphs()
    for prompt in prompts:
        ids = torch.tensor([prompt])
        compiled = model.generate(ids, max_new_tokens=24, cache="static", compile=True, eos_token_id=None)
        assert compiled.tolist() == model.generate(ids, max_new_tokens=24, eos_token_id=None).tolist()
    # 2 prompts x 23 decode steps under fullgraph=True (a graph break raises): one graph
    assert graphs() - before == 1
    # built with inductor's C++ wrapper (no Python between the step's calls), as packed CPU models are
    assert wants_cpp_wrapper(model, torch.device("cpu")) and list(compiled_decode._compiled) == [(False, True)]
    assert not wants_cpp_wrapper(kernelhub.from_pretrained(packed_gguf, dequantize=True), torch.device("cpu"))


def test_compiled_batching_on_packed_weights_gives_eager_tokens(packed_gguf):
    model = kernelhub.from_pretrained(packed_gguf, attn_implementation="paged|sdpa")
    rng = random.Random(0)
    prompts = [[rng.randrange(64) for _ in range(rng.randrange(1, 20))] for _ in range(12)]
    options = dict(max_new_tokens=6, max_batch_tokens=16, block_size=4)
    expected = model.generate_batch(prompts, **options)
    before = graphs()
    results = model.generate_batch(prompts, compile=True, **options)
    assert [r.tokens for r in results] == [r.tokens for r in expected]
    assert graphs() - before == len(results.stats["token_buckets"])  # once per token bucket, never per step
    again = model.generate_batch(prompts, compile=True, **options)
    assert [r.tokens for r in again] == [r.tokens for r in expected] and graphs() - before == len(
        results.stats["token_buckets"])
