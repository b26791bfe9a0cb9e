"""kernelhub.debug: traces, comparisons, `kernelhub diff` and the `assert_matches_reference` fixture."""

import argparse
import json
import math

import pytest
import torch

import kernelhub
from kernelhub import debug
from kernelhub.cli.diff import add_diff_command, parse_binding
from kernelhub.testing import write_kernel_repo

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])


class RMSNorm(torch.nn.Module):  # a correct kernel: the reference's math
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class ScaledRMSNorm(torch.nn.Module):  # a wrong one: 1% too large
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return 1.01 * self.weight * x.to(dtype)


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernels")
    return {"good": write_kernel_repo(root / "good", "good-norm", layers=[RMSNorm]),
            "wrong": write_kernel_repo(root / "wrong", "wrong-norm", layers=[_renamed()])}


def _renamed() -> str:
    """ScaledRMSNorm's source as `class RMSNorm`, the name the kernel repo must export."""
    import inspect

    return inspect.getsource(ScaledRMSNorm).replace("class ScaledRMSNorm", "class RMSNorm", 1)


def diff(*argv) -> int:
    parser = argparse.ArgumentParser(prog="kernelhub")
    add_diff_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diff", *map(str, argv)])
    return args.fn(args)


def by_path(tree):
    return {(n["module_path"], n["call"]): n for n in debug.nodes(tree)}


# -- trace ----------------------------------------------------------------------------------------

def test_stats_of_a_known_tensor():
    stats = debug.tensor_stats(torch.tensor([[1.0, 2.0], [3.0, -4.0]]))
    assert stats == {"shape": [2, 2], "dtype": "float32", "mean": 0.5, "std": pytest.approx(math.sqrt(7.25)),
                     "absmax": 4.0, "nan": 0, "inf": 0}
    bad = debug.tensor_stats(torch.tensor([1.0, float("nan"), float("inf"), float("-inf")], dtype=torch.bfloat16))
    assert bad["nan"] == 1 and bad["inf"] == 2 and bad["mean"] == "nan" and bad["absmax"] == "nan"
    assert debug.tensor_stats(torch.tensor([2, 4]))["mean"] == 3.0
    assert debug.tensor_stats(torch.ones(0, 3))["mean"] is None


def test_trace_records_every_module_call_nested_and_json_round_trips(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    tree = debug.trace(model, IDS)
    assert json.loads(json.dumps(tree, allow_nan=False)) == tree  # strict JSON, no tensors left in it
    assert (tree["module_path"], tree["type"]) == ("", "LlamaForCausalLM")
    assert [(o["name"], o["shape"]) for o in tree["outputs"]] == [("logits", [1, 8, 256])]
    decoder = tree["children"][0]["children"][2]
    assert (decoder["module_path"], decoder["type"]) == ("model.layers.0", "DecoderLayer")
    norm = decoder["children"][0]
    assert norm["module_path"] == "model.layers.0.input_layernorm" and norm["type"] == "RMSNorm"
    assert [(i["name"], i["shape"]) for i in norm["inputs"]] == [("0", [1, 8, 64])]
    assert [o["name"] for o in decoder["outputs"]] == ["0"]  # (hidden, None): the None is skipped
    # every module that is called ran; the order is the order calls finished
    assert {p for p, _ in by_path(tree)} == {p for p, _ in model.named_modules()} - {"model.layers"}  # a ModuleList
    assert [n["order"] for n in debug.nodes(tree)] == list(range(len(by_path(tree))))
    assert by_path(tree)[("model.layers.0.input_layernorm", 0)]["order"] < decoder["order"] < tree["order"]


def test_keep_tensors_holds_the_values_and_save_leaves_them_out(tiny_checkpoint, tmp_path):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    tree = debug.trace(model, {"input_ids": IDS}, keep_tensors=True)
    logits = model(IDS).logits
    assert torch.equal(torch.tensor(tree["outputs"][0]["value"]), logits)
    saved = debug.load(debug.save(tree, tmp_path / "t.json"))
    assert "value" not in saved["outputs"][0] and saved["outputs"][0]["mean"] == tree["outputs"][0]["mean"]
    assert debug.load(debug.save(tree, tmp_path / "full.json", tensors=True)) == tree
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(kernelhub.KernelhubError, match="is not a kernelhub trace"):
        debug.load(tmp_path / "junk.json")


def test_hooks_are_removed_when_the_forward_raises():
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), Boom())
    with pytest.raises(RuntimeError, match="boom"):
        debug.trace(model, torch.ones(1, 2))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(kernelhub.KernelhubError, match="inputs must be a tensor"):
        debug.trace(model, [1, 2])


def test_nested_outputs_are_walked():
    class Out(torch.nn.Module):
        def forward(self, x):
            return {"a": (x, [2 * x]), "n": None, "k": 3}

    tree = debug.trace(Out(), (torch.ones(2),))
    assert [(o["name"], o["mean"]) for o in tree["outputs"]] == [("a.0", 1.0), ("a.1.0", 2.0)]


# -- compare ------------------------------------------------------------------------------------------

def test_compare_names_the_first_divergent_module_also_from_saved_stats(tiny_checkpoint, tmp_path):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    good = debug.trace(model, IDS, keep_tensors=True)
    with kernelhub.use_kernels({"RMSNorm": ScaledRMSNorm}, model, verify=False):
        wrong = debug.trace(model, IDS, keep_tensors=True)
    result = debug.compare(good, wrong)
    first = result["first_divergent"]
    assert not result["ok"] and first["module_path"] == "model.layers.0.input_layernorm"
    assert first["max_rel"] == pytest.approx(0.01, rel=1e-3)
    rows = {r["module_path"]: r for r in result["modules"]}
    assert rows["model.embed_tokens"]["max_abs"] == 0.0 and not rows["model.embed_tokens"]["diverged"]
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    # statistics alone (saved traces) still find it
    stats_only = debug.compare(debug.load(debug.save(good, tmp_path / "a.json")),
                               debug.load(debug.save(wrong, tmp_path / "b.json")))
    assert stats_only["first_divergent"]["module_path"] == "model.layers.0.input_layernorm"
    assert debug.compare(good, good)["ok"]


# -- kernelhub diff -----------------------------------------------------------------------------

def test_diff_finds_a_wrong_local_kernel_and_exits_1(tiny_checkpoint, kernel_dirs, capsys):
    assert diff(tiny_checkpoint, "--a", "eager", "--b", f"attn=eager,kernels.RMSNorm={kernel_dirs['wrong']}") == 1
    out = capsys.readouterr().out
    assert "first divergent module: model.layers.0.input_layernorm (RMSNorm)" in out
    assert diff(tiny_checkpoint, "--a", "eager", "--b",
                json.dumps({"attn": "eager", "kernels": {"RMSNorm": str(kernel_dirs["wrong"])}}),
                "--ids", "1,2,3", "--json") == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ids"] == [1, 2, 3] and report["first_divergent"]["module_path"] == "model.layers.0.input_layernorm"


def test_diff_of_a_correct_kernel_and_of_sdpa_exits_0(tiny_checkpoint, kernel_dirs, capsys):
    assert diff(tiny_checkpoint, "--a", "eager", "--b", f"attn=eager,kernels.RMSNorm={kernel_dirs['good']}") == 0
    assert "match: no module diverges" in capsys.readouterr().out
    assert diff(tiny_checkpoint, "--a", "eager", "--b", "sdpa", "--json") == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_diff_tolerance_flags_decide(tiny_checkpoint, kernel_dirs, capsys):
    wrong = f"attn=eager,kernels.RMSNorm={kernel_dirs['wrong']}"
    assert diff(tiny_checkpoint, "--a", "eager", "--b", wrong, "--atol", "1e3") == 0


def test_diff_bad_arguments_are_clear_errors(tiny_checkpoint):
    with pytest.raises(kernelhub.KernelhubError, match="unknown key 'kernel.RMSNorm'"):
        diff(tiny_checkpoint, "--a", "eager", "--b", "attn=sdpa,kernel.RMSNorm=./x")
    with pytest.raises(kernelhub.KernelhubError, match="not valid JSON"):
        diff(tiny_checkpoint, "--a", "eager", "--b", "{attn: sdpa}")
    with pytest.raises(kernelhub.KernelhubError, match="outside the vocabulary"):
        diff(tiny_checkpoint, "--a", "eager", "--b", "sdpa", "--ids", "1,999")
    with pytest.raises(kernelhub.KernelhubError, match="no tokenizer"):
        diff(tiny_checkpoint, "--a", "eager", "--b", "sdpa", "--prompt", "hello")
    with pytest.raises(kernelhub.UnknownBackendError, match="sdpx"):
        diff(tiny_checkpoint, "--a", "eager", "--b", "sdpx")


def test_parse_binding_forms():
    assert parse_binding("paged|sdpa") == {"attn": "paged|sdpa", "kernels": None}
    assert parse_binding('["flex", "sdpa"]') == {"attn": ["flex", "sdpa"], "kernels": None}
    assert parse_binding('{"attn": {"*": "sdpa"}}') == {"attn": {"*": "sdpa"}, "kernels": None}
    with pytest.raises(kernelhub.KernelhubError, match="goes under \"attn\""):
        parse_binding('{"*": "sdpa"}')


# -- the pytest fixture ------------------------------------------------------------------------

def test_fixture_passes_for_a_correct_kernel_and_restores_the_binding(tiny_checkpoint, assert_matches_reference):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    before = model.binding.to_dict()
    result = assert_matches_reference(model, IDS, kernels={"RMSNorm": RMSNorm})
    assert result["ok"]
    assert model.binding.to_dict() == before


def test_fixture_fails_for_a_wrong_kernel_naming_the_module(tiny_checkpoint, assert_matches_reference):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    before = model.binding.to_dict()
    with pytest.raises(AssertionError, match=r"model\.layers\.0\.input_layernorm \(RMSNorm\) diverges from the "
                                             r"eager reference: max abs \S+, max rel 0\.01"):
        assert_matches_reference(model, IDS, kernels={"RMSNorm": ScaledRMSNorm})
    assert model.binding.to_dict() == before
    assert torch.equal(model(IDS).logits, kernelhub.from_pretrained(tiny_checkpoint, "sdpa")(IDS).logits)
