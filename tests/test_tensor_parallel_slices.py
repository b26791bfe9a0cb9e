"""Tensor-parallel plans and slice reading in one process (no process group): how a plan is
checked against the model, and how one rank's slices are read through a model's own file layout."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import kernelhub
import kernelhub.runtime.tensor_parallel_load as tp_load
from kernelhub.declare.fused import join_fused, split_fused
from kernelhub.models.llama import LlamaForCausalLM
from kernelhub.runtime.tensor_parallel import plan_shards, shard_model
from kernelhub.runtime.tensor_parallel_load import read_local_state
from tests.checkpoints import write_family_checkpoint, write_hf_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-llama")
    write_hf_checkpoint("llama", path)
    return path


def tiny(**overrides):
    with torch.device("meta"):
        return LlamaForCausalLM({"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 **overrides})


@pytest.mark.parametrize("plan, phrases", [
    ({"model.layers.*.self_attn.qkv_proj": "colwise"}, ["fuses 3 projections (16+8+8 rows)", "use 'packed_colwise'"]),
    ({"model.embed_tokens": "colwise"}, ["model.embed_tokens is an embedding: use 'vocab_embedding'"]),
    ({"model.layers.*.mlp": "rowwise"}, ["splits a linear layer's 2-D weight; model.layers.0.mlp is a MLP"]),
    ({"lm_head": "vocab_embedding"}, ["needs an nn.Embedding; lm_head is a Linear"]),
    ({"model.layers.*.mlp": "experts"}, ["needs an Experts layer"]),
    ({"lm_head": "colwise", "lm_*": "rowwise"}, ["matched by two tp_plan keys"]),
    ("everything", ["is not a plan", "'auto'"]),
])
def test_a_plan_that_cannot_apply_is_refused_naming_the_module(plan, phrases):
    model = tiny()
    with pytest.raises(kernelhub.TensorParallelError) as info:
        plan_shards(model, plan, world=2)
    for phrase in phrases:
        assert phrase in str(info.value), str(info.value)
    assert model.model.layers[0].self_attn.attn.num_heads == 4  # nothing changed


# -- reading slices through a model's own layout conversion (no process group: one rank's reads) -----------

def rank_state(model_class, config: dict, path, rank: int) -> dict:
    """What `read_local_state` gives rank `rank` of 2 for a `model_class` built from `config`."""
    with torch.device("meta"):
        model = model_class(config)
    tp = shard_model(model, plan_shards(model, "auto", world=2), rank=rank)
    return read_local_state(model, path, tp), tp, model


def expected_slice(full: torch.Tensor, shard, rank: int) -> torch.Tensor:
    if shard is None or shard.dim is None:
        return torch.zeros_like(full) if shard is not None and shard.partial and rank else full
    return torch.cat([full.narrow(shard.dim, a, b - a) for a, b in shard.ranges(rank, 2)], dim=shard.dim)


def assert_rank_slices(model_class, config, path, full_state):
    for rank in (0, 1):
        state, tp, model = rank_state(model_class, config, path, rank)
        shards = {f"{m}.{p.name}": p for m, s in tp.modules.items() for p in s.params}
        assert set(state) == {n for n, _ in model.named_parameters()}  # a tied alias is read once
        for name, tensor in state.items():
            want = expected_slice(full_state[name], shards.get(name), rank)
            assert tensor.shape == want.shape and torch.equal(tensor, want), name


def test_gpt_oss_experts_are_sliced_from_the_interleaved_transposed_file_layout(tmp_path):
    """gpt-oss files hold experts as [E, H, 2I] with gate/up interleaved: each rank reads one slice of
    the last dim and converts it; the sinks split with their heads. (Here 2I == H, so a loader that
    compared shapes only would read the file layout as ours without noticing.)"""
    from kernelhub.models.gpt_oss import GptOssForCausalLM

    write_family_checkpoint("gpt_oss", tmp_path)
    full = kernelhub.from_pretrained(tmp_path, attn_implementation="eager").state_dict()
    assert full["model.layers.0.mlp.experts.gate_up_proj"].shape[1:] == (64, 64)
    assert_rank_slices(GptOssForCausalLM, json.loads((tmp_path / "config.json").read_text()), tmp_path, full)


def relaid(t: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """down_proj's columns in another file order: even columns first, then odd ones."""
    n = t.shape[1]
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])
    return t[:, torch.argsort(order) if inverse else order]


class FlippedFiles(LlamaForCausalLM):
    """Its files hold down_proj's columns in reverse: a rank's columns are still one slice of the file."""

    def model_to_checkpoint(self, state):
        return {k: v.flip(1) if k.endswith("down_proj.weight") else v for k, v in split_fused(self, state).items()}

    def checkpoint_to_model(self, state):
        return join_fused(self, {k: v.flip(1) if k.endswith("down_proj.weight") else v for k, v in state.items()})


class ScatteredFiles(LlamaForCausalLM):
    """Its files hold down_proj's even columns first: a rank's columns are scattered over the file."""

    def model_to_checkpoint(self, state):
        return {k: relaid(v) if k.endswith("down_proj.weight") else v for k, v in split_fused(self, state).items()}

    def checkpoint_to_model(self, state):
        return join_fused(self, {k: relaid(v, True) if k.endswith("down_proj.weight") else v
                                 for k, v in state.items()})


def test_a_layout_conversion_is_applied_to_each_slice(llama, tmp_path):
    source = llama
    state = load_file(source / "model.safetensors")
    save_file({k: v.flip(1).contiguous() if k.endswith("down_proj.weight") else v for k, v in state.items()},
              tmp_path / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    full = kernelhub.from_pretrained(source, attn_implementation="eager").state_dict()
    assert_rank_slices(FlippedFiles, config, tmp_path, full)


def test_a_layout_a_rank_cannot_read_as_one_slice_is_refused_before_any_file_is_opened(llama, monkeypatch):
    def no_open(*args, **kwargs):
        raise AssertionError("a file was opened")

    monkeypatch.setattr(tp_load, "safe_open", no_open)
    config = json.loads((llama / "config.json").read_text())
    with pytest.raises(kernelhub.TensorParallelError) as info:
        rank_state(ScatteredFiles, config, llama, 1)
    message = str(info.value)
    assert message.startswith("ScatteredFiles: tensor parallelism cannot read model.layers.0.mlp.down_proj.weight")
    assert "are not one contiguous range of dim 1 of model.layers.0.mlp.down_proj.weight (64, 96)" in message
    assert "Load it without tp_plan" in message


def test_the_heads_style_needs_an_attention_modules_per_head_parameters():
    model = tiny()
    with pytest.raises(kernelhub.TensorParallelError, match="'heads' splits an attention module's own 1-D .* "
                                                            "model.layers.0.mlp \\(MLP\\) has no attention site"):
        plan_shards(model, {"model.layers.*.mlp": "heads"}, world=2)
