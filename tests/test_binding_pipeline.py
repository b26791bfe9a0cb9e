"""One binding pipeline: the same grammar and fallback rule for attention and layers, globs
that stay within a layer kind, contracts checked for every kernel, modes as flags, and a
plan that stays true after moves, `kernels.kernelize` and `use_kernels`."""

import pytest
import torch

import kernelhub
from kernelhub import Mode
from tests.attack_kernels import GOOD_RMSNORM, kernel
from tests.unchanged import assert_unchanged, registry_snapshot, snapshot

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


class ScaledRMSNorm(torch.nn.Module):
    """RMSNorm computed another way (a second implementation with the reference's numbers)."""

    kernel_layer_name = "RMSNorm"

    def forward(self, x):
        variance = (x.float() * x.float()).mean(-1, keepdim=True)
        return self.weight * (x.float() / torch.sqrt(variance + self.variance_epsilon)).to(x.dtype)


def layer_entries(plan, kind="layer"):
    return {e.path: e for e in plan.entries if e.kind == kind}


# -- one grammar for both arguments ----------------------------------------------------------

def _ask(argument, value):
    """The same request shape for attention (attn_implementation) or for RMSNorm layers (kernels)."""
    return ({"attn_implementation": value} if argument == "attention"
            else {"attn_implementation": "sdpa", "kernels": {"RMSNorm": value} if not isinstance(value, dict)
                  else value})


GOOD = {"attention": "eager", "layer": ScaledRMSNorm}
BROKEN_HUB = "kernelhub-test/does-not-exist@v1"


@pytest.mark.parametrize("argument", ["attention", "layer"])
def test_a_failing_hub_ref_inside_a_chain_is_a_recorded_rejection(model, argument, monkeypatch):
    monkeypatch.setenv("KERNELHUB_TRUSTED", "kernelhub-test")
    ref = BROKEN_HUB + (":attention_fn" if argument == "attention" else ":RMSNorm")
    plan = kernelhub.bind(model, **_ask(argument, [ref, GOOD[argument]]))
    entry = next(e for e in plan.entries if e.kind == argument)
    assert entry.chosen in ("eager", "ScaledRMSNorm")
    assert entry.rejected[0][0] == ref and "unreachable" in " ".join(entry.rejected[0][1])


def _unbuilt(tmp_path, argument) -> str:
    """A local kernel directory that was never built, named for `argument`'s symbol."""
    empty = tmp_path / "unbuilt"
    empty.mkdir()
    return f"{empty}:" + ("attention_fn" if argument == "attention" else "RMSNorm")


@pytest.mark.parametrize("argument", ["attention", "layer"])
def test_a_failing_local_directory_inside_a_chain_is_a_recorded_rejection(model, argument, tmp_path):
    ref = _unbuilt(tmp_path, argument)
    plan = kernelhub.bind(model, **_ask(argument, [ref, GOOD[argument]]))
    entry = next(e for e in plan.entries if e.kind == argument)
    assert entry.rejected[0][0] == ref and "no usable build" in " ".join(entry.rejected[0][1])


@pytest.mark.parametrize("argument", ["attention", "layer"])
def test_an_explicit_single_choice_that_cannot_load_is_an_error_listing_why(model, argument, tmp_path):
    ref = _unbuilt(tmp_path, argument)
    before, registry_before = snapshot(model), registry_snapshot()
    with pytest.raises(kernelhub.BindError, match="cannot serve .* no usable build"):
        kernelhub.bind(model, **_ask(argument, ref))
    assert_unchanged(model, before)
    assert registry_snapshot() == registry_before


@pytest.mark.parametrize("argument", ["attention", "layer"])
def test_name_list_and_glob_shapes_choose_alike(model, argument):
    good = GOOD[argument]
    rest = {"*": "sdpa"} if argument == "attention" else {}  # every site needs a backend; a layer has its own
    for value in (good, [good], {"model.layers.1.*": good, **rest}):
        plan = kernelhub.bind(model, **_ask(argument, value))
        chosen = {e.path: e.chosen for e in plan.entries
                  if e.kind == argument and (argument == "attention" or "(RMSNorm)" in e.source)}
        expected = "eager" if argument == "attention" else "ScaledRMSNorm"
        if isinstance(value, dict):
            assert {p for p, c in chosen.items() if c == expected} == {p for p in chosen if ".layers.1." in p}
        else:
            assert set(chosen.values()) == {expected}


@pytest.mark.parametrize("argument", ["attention", "layer"])
def test_a_glob_that_matches_nothing_is_an_error(model, argument):
    before = snapshot(model)
    with pytest.raises(kernelhub.KernelhubError, match="model.decoder"):
        kernelhub.bind(model, **_ask(argument, {"model.decoder.*": GOOD[argument],
                                                **({"*": "sdpa"} if argument == "attention" else {})}))
    assert_unchanged(model, before)


# -- globs stay within a layer kind; contracts -------------------------------------------------

def test_a_glob_only_reaches_layers_its_kernel_implements(model):
    plan = kernelhub.bind(model, "sdpa", kernels={"model.layers.0.*": ScaledRMSNorm})
    chosen = {p: e.chosen for p, e in layer_entries(plan).items() if ".layers.0." in p}
    assert {p for p, c in chosen.items() if c == "ScaledRMSNorm"} == {
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"}
    assert all(c == "reference" for p, c in chosen.items() if "layernorm" not in p)
    with torch.no_grad():
        model(IDS)  # the forward runs: nothing was bound across layer kinds


def test_a_local_kernel_under_a_glob_is_for_the_layer_its_symbol_names(model, tmp_path):
    repo = kernel(tmp_path, "norm", layers=[GOOD_RMSNORM])
    plan = kernelhub.bind(model, "sdpa", kernels={"model.layers.1.*": f"{repo}:RMSNorm"})
    bound = {p for p, e in layer_entries(plan).items() if e.source.startswith("local")}
    assert bound == {"model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm"}
    before = snapshot(model)
    with pytest.raises(kernelhub.KernelhubError, match="does not say which layer it implements"):
        kernelhub.bind(model, "sdpa", kernels={"model.layers.1.*": str(repo)})
    assert_unchanged(model, before)


class TwoArgs(torch.nn.Module):
    def forward(self, x, y):
        return x


@pytest.mark.parametrize("impl, phrase", [
    (TwoArgs, "forward(self, x, y) does not match RMSNorm.forward(self, x)"),
    (torch.nn.Module, "defines no forward of its own"),
    (type("Plain", (), {"forward": lambda self, x: x}), "is not an nn.Module subclass"),
    (lambda x: x, "is not an nn.Module subclass"),
])
def test_contract_violations_are_refused_at_bind(model, impl, phrase):
    before, registry_before = snapshot(model)[0:6], registry_snapshot()
    with pytest.raises(kernelhub.BindError) as info:
        kernelhub.bind(model, "sdpa", kernels={"RMSNorm": impl})
    assert phrase in str(info.value), str(info.value)
    assert_unchanged(model, before)
    assert registry_snapshot() == registry_before


# -- modes -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode, training", [
    (Mode.TRAINING, True), ("training", True), (Mode.INFERENCE | Mode.TORCH_COMPILE, False),
    ("training|compile", True), ("compile", False),
])
def test_modes_as_flags_and_strings(tiny_checkpoint, mode, training):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation=["flex", "sdpa"], mode=mode)
    assert model.training is training
    assert model.binding.chosen() == ({"sdpa"} if training else {"flex"})


def test_kernels_mode_values_are_accepted(tiny_checkpoint):
    import kernels

    model = kernelhub.from_pretrained(tiny_checkpoint, "sdpa", mode=kernels.Mode.TRAINING | kernels.Mode.TORCH_COMPILE)
    assert model.binding.mode == "training|compile"


def test_bad_modes_are_clear_errors(model):
    for bad in ("serving", "inference|training", 3, ""):
        with pytest.raises(kernelhub.KernelhubError, match="inference, training, compile"):
            kernelhub.bind(model, "sdpa", mode=bad)


def test_an_inference_flex_model_runs_with_autograd_on_and_refuses_a_backward_clearly(tiny_checkpoint):
    flex = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="flex")
    eager = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    assert torch.is_grad_enabled()
    logits = flex(IDS).logits
    torch.testing.assert_close(logits, eager(IDS).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(kernelhub.BindError, match="'flex' has no backward on cpu.*mode=kernelhub.Mode.TRAINING"):
        logits.sum().backward()


# -- the plan is the truth ---------------------------------------------------------------

def test_moving_to_bfloat16_updates_the_plan(model):
    assert model.binding.dtype == "float32"
    model.to(torch.bfloat16)
    assert model.binding.dtype == "bfloat16" and next(model.parameters()).dtype == torch.bfloat16
    assert {e.chosen for e in model.binding.entries if e.kind == "attention"} == {"sdpa"}


def test_a_move_the_binding_cannot_serve_fails_before_anything_moves(tiny_checkpoint):
    class Fp32Only(ScaledRMSNorm):
        dtypes = (torch.float32,)

    model = kernelhub.from_pretrained(tiny_checkpoint, "sdpa", kernels={"RMSNorm": Fp32Only})
    before = snapshot(model)
    with pytest.raises(kernelhub.BindError, match="supports float32, not bfloat16"):
        model.to(torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32
    assert_unchanged(model, before)


def test_a_forward_replaced_by_kernels_kernelize_shows_in_the_plan(model, tmp_path):
    import kernels

    repo = kernel(tmp_path, "norm")
    mapping = {"RMSNorm": {"cpu": kernels.LocalLayerRepository(repo_path=repo, layer_name="RMSNorm")}}
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.INFERENCE, device="cpu")
    entry = model.binding["model.layers.0.input_layernorm"]
    assert entry.chosen == "replaced outside kernelhub" and "RMSNorm" in entry.source and "reference" in entry.note


def test_use_kernels_keeps_mode_dtype_and_in_process_kernels_and_restores_exactly(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, "sdpa", kernels={"SiLUAndMul": "reference",
                                                                         "RMSNorm": ScaledRMSNorm},
                                      dtype=torch.bfloat16, mode="training")
    before = snapshot(model)
    plan = model.binding

    class Zero(torch.nn.Module):
        kernel_layer_name = "ApplyRotary"

        def forward(self, q, k, cos, sin):
            return q, k

    with kernelhub.use_kernels({"ApplyRotary": Zero}, model, verify=False):
        inside = model.binding
        assert inside.mode == "training" and inside.dtype == "bfloat16"
        assert inside["model.layers.0.input_layernorm"].chosen == "ScaledRMSNorm"
        assert inside["model.layers.0.self_attn.rotary"].chosen == "Zero"
    assert model.binding is plan
    assert_unchanged(model, before)


def test_a_bare_name_that_is_a_directory_is_never_guessed(model, tmp_path, monkeypatch):
    kernel(tmp_path, "my-rmsnorm")
    monkeypatch.chdir(tmp_path)
    before = snapshot(model)
    with pytest.raises(kernelhub.KernelhubError, match="a directory my-rmsnorm exists; write ./my-rmsnorm"):
        kernelhub.bind(model, "sdpa", kernels={"RMSNorm": "my-rmsnorm"})
    assert_unchanged(model, before)
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": "./my-rmsnorm"})
    assert any(e.source.startswith("local ") for e in plan.entries)
