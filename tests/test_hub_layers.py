"""Layer kernels from the Hub (through olah on loopback) and from local directories."""

import torch

import kernelhub

ORG = "kernelhub-test"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_llama_with_hub_kernels_matches_reference_and_plan_names_commits(hub, tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    ids = torch.randint(0, 100, (2, 7))
    reference = _logits(model, ids)
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": f"{ORG}/rmsnorm@v1",
                                                  "SiLUAndMul": f"{ORG}/silu-and-mul@v1",
                                                  "ApplyRotary": f"{ORG}/rotary@main:ApplyRotary"})
    torch.testing.assert_close(_logits(model, ids), reference, atol=1e-5, rtol=1e-5)
    sources = {e.chosen: e.source for e in plan.entries if e.kind == "layer"}
    assert sources[f"{ORG}/rmsnorm@v1:RMSNorm"] == f"hub {ORG}/rmsnorm@{hub.commits['rmsnorm']} (RMSNorm)"
    assert sources[f"{ORG}/rotary@main:ApplyRotary"].startswith(f"hub {ORG}/rotary@{hub.commits['rotary']}")
    assert f"{ORG}/rmsnorm@{hub.commits['rmsnorm']}" in str(model.binding)


def test_bert_with_hub_layernorm_matches_reference(hub):
    from kernelhub.testing.samples import minilm_dir

    model = kernelhub.from_pretrained(minilm_dir(), attn_implementation="sdpa")
    batch = {"input_ids": torch.tensor([[101, 7592, 2088, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        reference = model(**batch).last_hidden_state
        plan = kernelhub.bind(model, "sdpa", kernels={"LayerNorm": f"{ORG}/layernorm@v1"})
        out = model(**batch).last_hidden_state
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    norms = [p for p, m in model.named_modules() if getattr(type(m), "kernel_layer_name", None) == "LayerNorm"]
    bound = [e.path for e in plan.entries if e.kind == "layer" and "LayerNorm" in e.source]
    assert norms and bound == norms  # every LayerNorm of the encoder runs the Hub kernel
    assert all(e.chosen == f"{ORG}/layernorm@v1:LayerNorm" for e in plan.entries if e.kind == "layer"
               and "LayerNorm" in e.source)


def test_versions_branches_and_commit_pins_resolve_through_the_server(hub, tiny_checkpoint, tmp_path):
    import shutil

    v2_source = shutil.copytree(hub.repos["rmsnorm"], tmp_path / "rmsnorm-v2")
    (v2_source / "NOTES.md").write_text("version 2\n")
    v1 = hub.commits["rmsnorm"]
    v2 = hub.publish(f"{ORG}/rmsnorm-versions", hub.repos["rmsnorm"], branches=("main", "v1"))
    v2b = hub.publish(f"{ORG}/rmsnorm-versions", v2_source, branches=("main", "v2"))
    assert v1 and v2 != v2b
    model = kernelhub.from_pretrained(tiny_checkpoint)
    for rev, commit in (("v1", v2), ("v2", v2b), ("main", v2b), (v2, v2)):
        plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": f"{ORG}/rmsnorm-versions@{rev}"})
        assert {e.source for e in plan.entries if "RMSNorm" in e.source} == \
            {f"hub {ORG}/rmsnorm-versions@{commit} (RMSNorm)"}, rev


def test_local_directory_binds_without_any_server(tiny_checkpoint):
    from tests.hub_test_kernels import HUB_KERNELS  # built once per run (conftest)

    model = kernelhub.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 100, (1, 5))
    reference = _logits(model, ids)
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": str(HUB_KERNELS / "rmsnorm")})
    torch.testing.assert_close(_logits(model, ids), reference, atol=1e-5, rtol=1e-5)
    assert {e.source for e in plan.entries if "RMSNorm" in e.source} == {f"local {HUB_KERNELS / 'rmsnorm'} (RMSNorm)"}


def test_hugging_face_kernelize_binds_our_decorated_layers(tiny_checkpoint):
    from kernels import LocalLayerRepository, Mode, kernelize, use_kernel_mapping

    from tests.hub_test_kernels import HUB_KERNELS  # built once per run (conftest)

    model = kernelhub.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 100, (1, 5))
    reference = _logits(model, ids)
    mapping = {"RMSNorm": {"cpu": LocalLayerRepository(repo_path=HUB_KERNELS / "rmsnorm", layer_name="RMSNorm")}}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(model, mode=Mode.INFERENCE, device="cpu")
    assert "forward" in vars(model.model.norm)  # kernels replaced the instance forward
    assert model.model.norm.forward.__func__.__module__.endswith("layers")
    torch.testing.assert_close(_logits(model, ids), reference, atol=1e-5, rtol=1e-5)


def test_training_and_compile_modes_honour_the_kernel_flags(hub, tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    chain = [f"{ORG}/rotary@v1", "reference"]  # rotary: has_backward=False
    plan = kernelhub.bind(model, "sdpa", kernels={"ApplyRotary": chain, "RMSNorm": f"{ORG}/rmsnorm@v1"},
                          mode="training")
    rotary = next(e for e in plan.entries if e.path.endswith("rotary"))
    assert rotary.chosen == "reference"
    assert rotary.rejected == ((f"{ORG}/rotary@v1:ApplyRotary", ("has_backward=False, cannot train",)),)
    norm = next(e for e in plan.entries if e.path.endswith("input_layernorm"))
    assert norm.chosen == f"{ORG}/rmsnorm@v1:RMSNorm"  # rmsnorm has a Triton backward
    # counted declares no can_torch_compile (Hub default: False); rmsnorm is a custom op, compile-safe
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": [f"{ORG}/counted@v1", f"{ORG}/rmsnorm@v1"]},
                          mode="compile")
    norm = next(e for e in plan.entries if e.path.endswith("input_layernorm"))
    assert norm.chosen == f"{ORG}/rmsnorm@v1:RMSNorm"
    assert norm.rejected[0][0] == f"{ORG}/counted@v1:RMSNorm" and "can_torch_compile=False" in norm.rejected[0][1][0]


def test_training_through_the_triton_rmsnorm_backward(hub, tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, mode="training")
    ids = torch.randint(0, 100, (1, 6))
    model(ids).logits.sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    kernelhub.bind(model, "sdpa", kernels={"RMSNorm": f"{ORG}/rmsnorm@v1", "SiLUAndMul": f"{ORG}/silu-and-mul@v1"},
                   mode="training")
    model(ids).logits.sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, reference[name], atol=1e-4, rtol=1e-4, msg=name)
