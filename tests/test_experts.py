"""`Experts`: every kernel against the reference loop, capability refusals, transformers' spelling,
and checkpoint layouts against files transformers writes."""

import json

import pytest
import torch
from safetensors.torch import save_file

import kernelhub
from kernelhub.backends.experts import FEW_ROWS, BatchedMMExperts, GroupedMMExperts
from kernelhub.declare.experts import (Experts, from_gpt_oss_layout, fuse_per_expert, split_per_expert,
                                       to_gpt_oss_layout)
from kernelhub.registry.layer_contract import contract_problems
from tests.hub_test_kernels import HUB_KERNELS
from tests.unchanged import refused

MOE = HUB_KERNELS / "moe"
# Relative to the output's largest magnitude: float32 to rounding, bfloat16 to a few ulps (2**-8 each).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


class TinyMoE(torch.nn.Module):
    """A router (kept in the model, as in Qwen3-MoE) and one declared `Experts` layer."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        e, h, i = config["num_experts"], config["hidden_size"], config["intermediate_size"]
        self.top_k = config["top_k"]
        self.router = torch.nn.Linear(h, e, bias=False)
        self.experts = Experts(e, h, i, bias=config.get("bias", False), activation=config.get("activation", "silu"))
        self.binding = self.binding_request = None  # set by kernelhub.bind, as on every model

    def forward(self, x):
        weights, index = self.router(x).softmax(-1).topk(self.top_k, dim=-1)
        return self.experts(x, index, weights / weights.sum(-1, keepdim=True))

    def model_to_checkpoint(self, state):  # the file holds Qwen3-MoE's per-expert tensors
        return split_per_expert(state)

    def checkpoint_to_model(self, state):
        return fuse_per_expert(state)


def tiny(num_experts=4, hidden=16, inter=8, top_k=2, bias=False, activation="silu", dtype=torch.float32, seed=0):
    config = {"num_experts": num_experts, "hidden_size": hidden, "intermediate_size": inter, "top_k": top_k,
              "bias": bias, "activation": activation}
    g = torch.Generator().manual_seed(seed)
    model = TinyMoE(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if "bias" not in name else 2))
    return model.to(dtype)


def routing(tokens, num_experts, top_k, seed=0):
    """Distinct experts per token, never the last one: at least one expert receives no tokens."""
    g = torch.Generator().manual_seed(seed)
    index = [torch.randperm(num_experts - 1, generator=g)[:top_k] for _ in range(tokens)]
    index = torch.stack(index) if index else torch.zeros(0, top_k, dtype=torch.int64)
    return index, torch.rand(tokens, top_k, generator=g)


KERNELS = ["eager", "grouped_mm", "batched_mm", "moe"]


def kernel_ref(name):
    if name != "moe":
        return name  # hub_kernels/moe is built once per run (conftest)
    return f"./{MOE.relative_to(MOE.parents[1])}:Experts"


@pytest.fixture
def at_repo_root(monkeypatch):
    monkeypatch.chdir(HUB_KERNELS.parent)


def dense_oracle(experts, x, index, weights):
    """Every expert on every token in float64, combined by a one-hot of the routing: no loop, sort or gather."""
    gate_up = torch.einsum("th,eih->eti", x.double(), experts.gate_up_proj.double())
    down_bias = 0.0
    if experts.gate_up_proj_bias is not None:
        gate_up = gate_up + experts.gate_up_proj_bias.double()[:, None]
        down_bias = experts.down_proj_bias.double()[:, None]
    gate, up = gate_up[..., :experts.intermediate_size], gate_up[..., experts.intermediate_size:]
    if experts.activation == "silu":
        hidden = gate / (1 + torch.exp(-gate)) * up
    else:  # gpt-oss: (up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g), g = gate.clamp(max=limit)
        gate, up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
        hidden = (up + 1) * gate / (1 + torch.exp(-experts.alpha * gate))
    every = torch.einsum("eti,ehi->eth", hidden, experts.down_proj.double()) + down_bias  # [E, T, H]
    combine = (torch.nn.functional.one_hot(index, experts.num_experts).double() * weights.double()[..., None]).sum(1)
    return torch.einsum("te,eth->th", combine, every)


def assert_matches_oracle(got, experts, x, index, weights, context=()):
    want = dense_oracle(experts, x, index, weights)
    assert got.shape == want.shape == x.shape and got.dtype == x.dtype, context
    if not len(x):
        return
    diff = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1.0))
    assert diff <= TOLERANCE[x.dtype], (*context, diff)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,activation", [(False, "silu"), (True, "swiglu_clamped"), (True, "silu")])
@pytest.mark.parametrize("kernel", [None, *KERNELS])
def test_every_kernel_and_the_reference_match_a_dense_oracle(kernel, bias, activation, dtype, at_repo_root):
    # expert count, tokens, top-k (T=0 and T=1 included); the Triton kernel runs interpreted: fewer, smaller cases
    # 40 tokens at top-2 exceed FEW_ROWS: grouped_mm runs torch._grouped_mm there, its few-rows path below
    cases = [(4, 5, 1), (6, 7, 2), (8, 3, 4), (4, 1, 2), (4, 0, 2), (6, 40, 2)]
    if kernel == "moe":
        cases = [(6, 4, 2), (5, 1, 4)]
    for num_experts, tokens, top_k in cases:
        model = tiny(num_experts, top_k=top_k, bias=bias, activation=activation, dtype=dtype, seed=tokens)
        if kernel is not None:  # None: the unbound layer, i.e. the reference loop itself
            plan = kernelhub.bind(model, kernels={"Experts": kernel_ref(kernel)})
            (entry,) = [e for e in plan.entries if e.path == "experts"]
            assert entry.chosen == ("hub_kernels/moe:Experts" if kernel == "moe" else kernel)
            assert entry.source == ("local hub_kernels/moe (Experts)" if kernel == "moe" else "builtin (Experts)")
        x = torch.randn(tokens, 16, dtype=dtype) * (3 if activation == "swiglu_clamped" else 1)  # reach the clamps
        index, weights = routing(tokens, num_experts, top_k, seed=tokens)
        with torch.no_grad():
            got = model.experts(x, index, weights.to(dtype))
            assert_matches_oracle(got, model.experts, x, index, weights.to(dtype), (num_experts, tokens, top_k))


def test_the_oracle_catches_a_wrong_expert():
    model = tiny(4, top_k=2, bias=True)
    x, (index, weights) = torch.randn(3, 16), routing(3, 4, 2)
    with torch.no_grad():
        got = model.experts(x, index, weights)
        assert_matches_oracle(got, model.experts, x, index, weights)
        with pytest.raises(AssertionError):
            assert_matches_oracle(model.experts(x, (index + 1) % 4, weights), model.experts, x, index, weights)


def test_grouped_mm_takes_the_few_rows_path_at_decode_only(monkeypatch):
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    model = tiny(8, top_k=4, bias=True)
    kernelhub.bind(model, kernels={"Experts": "grouped_mm"})
    for tokens in (1, FEW_ROWS // 4, FEW_ROWS // 4 + 1):
        x, (index, weights) = torch.randn(tokens, 16), routing(tokens, 8, 4, seed=tokens)
        with torch.no_grad():
            assert_matches_oracle(model.experts(x, index, weights), model.experts, x, index, weights, (tokens,))
    assert calls == [(FEW_ROWS // 4 + 1) * 4] * 2  # gate/up and down, for the batch past FEW_ROWS pairs only


def test_grouped_mm_at_decode_reads_non_contiguous_weights_and_inputs():
    model = tiny(6, top_k=2, bias=True)
    with torch.no_grad():  # the same values, stored transposed
        model.experts.gate_up_proj = torch.nn.Parameter(model.experts.gate_up_proj.transpose(1, 2).contiguous()
                                                        .transpose(1, 2))
    assert not model.experts.gate_up_proj.is_contiguous()
    kernelhub.bind(model, kernels={"Experts": "grouped_mm"})
    x, (index, weights) = torch.randn(16, 3).t(), routing(3, 6, 2)
    with torch.no_grad():
        assert_matches_oracle(model.experts(x, index, weights), model.experts, x, index, weights)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_serves_shapes_grouped_mm_itself_refuses(dtype):
    # 6 * 2 bytes and 6 * 4 bytes are not multiples of 16: torch._grouped_mm refuses these strides
    model = tiny(5, hidden=12, inter=6, top_k=2, bias=True, dtype=dtype)
    kernelhub.bind(model, kernels={"Experts": "grouped_mm"})
    tokens = FEW_ROWS // 2 + 1  # past the few-rows path: the grouped route with its per-expert fallback
    x, (index, weights) = torch.randn(tokens, 12, dtype=dtype), routing(tokens, 5, 2)
    with torch.no_grad():
        assert_matches_oracle(model.experts(x, index, weights.to(dtype)), model.experts, x, index, weights.to(dtype))


def test_whole_model_forward_through_bind_and_unbind():
    model = tiny(6, top_k=2, bias=True, activation="swiglu_clamped")
    x = torch.randn(9, 16)
    want = model(x)
    kernelhub.bind(model, kernels={"Experts": "grouped_mm"})
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)
    assert "grouped_mm" in str(model.binding)
    kernelhub.unbind(model)
    assert torch.equal(model(x), want)


class PlainExperts(torch.nn.Module):
    """Serves silu experts without biases only (declares no `supports`)."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return BatchedMMExperts.forward(self, hidden_states, top_k_index, top_k_weights)


def test_a_kernel_lacking_bias_is_refused_with_the_reason():
    model = tiny(bias=True)
    message = refused(model, kernelhub.BindError, ["'experts'", "lacks bias support; experts has expert biases"],
                      kernels={"Experts": PlainExperts}, attn=None)
    assert "swiglu" not in message  # only what is missing is named
    refused(tiny(activation="swiglu_clamped"), kernelhub.BindError,
            ["lacks swiglu_clamped support; experts uses the clamped SwiGLU activation"],
            kernels={"Experts": PlainExperts}, attn=None)
    plan = kernelhub.bind(tiny(), kernels={"Experts": PlainExperts})  # plain experts: it serves
    assert [e.chosen for e in plan.entries if e.path == "experts"] == ["PlainExperts"]


def test_a_kernel_lacking_bias_is_skipped_with_the_reason_in_a_preference_list():
    model = tiny(bias=True)
    plan = kernelhub.bind(model, kernels={"Experts": [PlainExperts, "grouped_mm"]})
    (entry,) = [e for e in plan.entries if e.path == "experts"]
    assert entry.chosen == "grouped_mm"
    assert entry.rejected == (("PlainExperts", ("lacks bias support; experts has expert biases",)),)


def test_supports_is_data_checked_like_the_other_capabilities():
    class Bad(torch.nn.Module):
        supports = "bias"  # a string, not a tuple of names

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    assert any("Bad.supports is 'bias'" in p for p in contract_problems(Bad, Experts, hub=True))
    assert contract_problems(GroupedMMExperts, Experts, hub=True) == []  # supports is allowed in the Hub contract


def test_grouped_mm_is_refused_for_training_with_the_reason():
    refused(tiny(), kernelhub.BindError, ["has_backward=False, cannot train"], kernels={"Experts": "grouped_mm"},
            attn=None, mode="training")


def test_kernel_requirements_and_bad_arguments():
    assert Experts(2, 4, 4).kernel_requirements() == ()
    assert Experts(2, 4, 4, bias=True).kernel_requirements() == ("bias",)
    assert Experts(2, 4, 4, activation="swiglu_clamped").kernel_requirements() == ("swiglu_clamped",)
    with pytest.raises(ValueError, match="activation 'gelu' is unknown; valid: silu, swiglu_clamped"):
        Experts(2, 4, 4, activation="gelu")
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        Experts(0, 4, 4)


# --- transformers' spelling through from_pretrained ----------------------------------------------------------------

@pytest.fixture
def moe_checkpoint(tmp_path, isolated_registry):
    """A TinyMoE checkpoint (per-expert tensors, as Qwen3-MoE files) and its architecture registered by a plugin."""
    class Plugin:
        @kernelhub.hookimpl
        def kernelhub_model_architectures(self):
            return {"tiny_moe": TinyMoE}

    isolated_registry.add_plugin(Plugin(), "tiny-moe")
    model = tiny(bias=False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny_moe", **model.config}))
    save_file(model.model_to_checkpoint(dict(model.state_dict())), str(tmp_path / "model.safetensors"))
    return tmp_path, model


def _experts_entry(plan):
    return [(e.chosen, e.source, e.request) for e in plan.entries if e.path == "experts"]


def test_experts_implementation_lands_in_the_same_plan_as_kernels(moe_checkpoint):
    path, original = moe_checkpoint
    by_kernels = kernelhub.from_pretrained(path, kernels={"Experts": "grouped_mm"})
    by_spelling = kernelhub.from_pretrained(path, experts_implementation="grouped_mm")
    assert _experts_entry(by_spelling.binding) == _experts_entry(by_kernels.binding)
    assert _experts_entry(by_spelling.binding)[0][:2] == ("grouped_mm", "builtin (Experts)")
    assert by_spelling.binding_request == by_kernels.binding_request
    x = torch.randn(5, 16)
    torch.testing.assert_close(by_spelling(x), original(x), atol=1e-5, rtol=1e-5)  # weights loaded through the hook
    assert _experts_entry(kernelhub.explain(path, experts_implementation="batched_mm"))[0][0] == "batched_mm"
    assert _experts_entry(kernelhub.explain(path, experts_implementation="eager"))[0][0] == "eager"
    same = kernelhub.explain(path, kernels={"Experts": "batched_mm"}, experts_implementation="batched_mm")
    assert _experts_entry(same)[0][0] == "batched_mm"


def test_experts_implementation_conflicts_and_unknown_names_are_clear_errors(moe_checkpoint, tiny_checkpoint):
    path, _ = moe_checkpoint
    with pytest.raises(kernelhub.KernelhubError, match=r"experts_implementation='grouped_mm' and "
                                                       r"kernels\['Experts'\]='batched_mm' ask for different"):
        kernelhub.from_pretrained(path, kernels={"Experts": "batched_mm"}, experts_implementation="grouped_mm")
    with pytest.raises(kernelhub.KernelhubError, match="no kernel 'sonicmoe' is registered for layer 'Experts'.*"
                                                       "Valid: .*batched_mm"):
        kernelhub.explain(path, experts_implementation="sonicmoe")
    with pytest.raises(kernelhub.KernelhubError, match="this model has no Experts layer"):
        kernelhub.explain(tiny_checkpoint, experts_implementation="grouped_mm")


def test_a_checkpoint_missing_an_expert_names_the_file_tensor(moe_checkpoint):
    path, model = moe_checkpoint
    state = model.model_to_checkpoint(dict(model.state_dict()))
    del state["experts.2.up_proj.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(kernelhub.CheckpointError, match=r"lacks 1 weight\(s\) the model needs: experts.2.up_proj"):
        kernelhub.from_pretrained(path)


# --- checkpoint layouts against files transformers writes --------------------------------------------------------

def test_qwen3_moe_files_convert_to_transformers_in_memory_layout_and_back(tmp_path):
    import transformers
    from safetensors.torch import load_file

    config = transformers.Qwen3MoeConfig(vocab_size=32, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         num_experts=4, num_experts_per_tok=2)
    hf = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_()
    hf.save_pretrained(tmp_path)
    file = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in file
    ours = fuse_per_expert(file)
    theirs = hf.model.layers[0].mlp.experts
    assert torch.equal(ours["model.layers.0.mlp.experts.gate_up_proj"], theirs.gate_up_proj)
    assert torch.equal(ours["model.layers.0.mlp.experts.down_proj"], theirs.down_proj)
    back = split_per_expert(ours)
    assert back.keys() == file.keys() and all(torch.equal(back[k], file[k]) for k in file)
    experts = Experts(4, 16, 8)
    experts.load_state_dict({"gate_up_proj": theirs.gate_up_proj, "down_proj": theirs.down_proj})
    x, (index, weights) = torch.randn(5, 16), routing(5, 4, 2)
    torch.testing.assert_close(experts(x, index, weights), theirs(x, index, weights), atol=1e-5, rtol=1e-5)


def test_gpt_oss_files_convert_to_our_layout_and_compute_what_transformers_computes(tmp_path):
    import transformers
    from safetensors.torch import load_file

    config = transformers.GptOssConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_local_experts=4,
                                       num_experts_per_tok=2)
    hf = transformers.GptOssForCausalLM(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    file = load_file(tmp_path / "model.safetensors")
    theirs = hf.model.layers[0].mlp.experts
    prefix = "model.layers.0.mlp.experts."
    assert file[prefix + "gate_up_proj"].shape == (4, 16, 16) and torch.equal(file[prefix + "gate_up_proj"],
                                                                              theirs.gate_up_proj)
    ours = from_gpt_oss_layout(file)
    back = to_gpt_oss_layout(ours)
    assert back.keys() == file.keys() and all(torch.equal(back[k], file[k]) for k in file)
    experts = Experts(4, 16, 8, bias=True, activation="swiglu_clamped", swiglu_alpha=theirs.alpha,
                      swiglu_limit=theirs.limit)
    experts.load_state_dict({k.removeprefix(prefix): v for k, v in ours.items() if k.startswith(prefix)})
    x, (index, weights) = torch.randn(6, 16) * 3, routing(6, 4, 2)  # large enough to reach the clamps
    torch.testing.assert_close(experts(x, index, weights), theirs(x, index, weights), atol=1e-5, rtol=1e-5)


def test_conversions_work_on_meta_tensors_and_round_trip():
    with torch.device("meta"):
        fused = {"m.experts.gate_up_proj": torch.empty(3, 8, 5), "m.experts.down_proj": torch.empty(3, 5, 4),
                 "m.experts.gate_up_proj_bias": torch.empty(3, 8), "m.norm.weight": torch.empty(5)}
    per_expert = split_per_expert(fused)
    assert per_expert["m.experts.2.gate_proj.weight"].shape == (4, 5) and per_expert["m.norm.weight"].is_meta
    assert {k: v.shape for k, v in fuse_per_expert(per_expert).items()} == {k: v.shape for k, v in fused.items()}
    file = to_gpt_oss_layout(fused)
    assert file["m.experts.gate_up_proj"].shape == (3, 5, 8) and file["m.experts.down_proj"].shape == (3, 4, 5)
    real = {"experts.gate_up_proj": torch.randn(2, 6, 3), "experts.gate_up_proj_bias": torch.randn(2, 6),
            "experts.down_proj": torch.randn(2, 3, 3), "experts.down_proj_bias": torch.randn(2, 3)}
    assert all(torch.equal(v, from_gpt_oss_layout(to_gpt_oss_layout(real))[k]) for k, v in real.items())
    with pytest.raises(kernelhub.CheckpointError, match="expert 0 lacks m.experts.0.down_proj.weight"):
        fuse_per_expert({"m.experts.0.gate_proj.weight": torch.ones(1, 1),
                         "m.experts.0.up_proj.weight": torch.ones(1, 1)})


def test_backends_cli_lists_layer_kernels_with_capabilities(capsys):
    from kernelhub.cli.commands import main

    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    experts = out[out.index("Experts:"):]
    assert "grouped_mm" in experts and "batched_mm" in experts and "bias, swiglu_clamped" in experts
