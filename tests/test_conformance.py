"""Conformance at bind: every layer kernel, and every Hub or local attention kernel, is probed
against the reference it replaces before it is applied; past the layer's tolerance it is refused
with the measured error, falls back in a chain, and `verify=False` binds it anyway."""

import pytest
import torch

import kernelhub
from kernelhub.declare.probe import TOLERANCE
from kernelhub.registry.conformance import check_layer
from kernelhub.testing import populate_hub_cache, write_kernel_repo
from tests.unchanged import refused


class TimesOnePointFive(torch.nn.Module):
    """RMSNorm's numbers times 1.5."""

    kernel_layer_name = "RMSNorm"

    def forward(self, x):
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return 1.5 * self.weight * out.to(x.dtype)


class SameNumbers(torch.nn.Module):
    """RMSNorm computed another way: the reference's numbers."""

    kernel_layer_name = "RMSNorm"

    def forward(self, x):
        variance = (x.float() * x.float()).mean(-1, keepdim=True)
        return self.weight * (x.float() / torch.sqrt(variance + self.variance_epsilon)).to(x.dtype)


def scaled_kernel(factor: float):
    """An RMSNorm kernel off by a relative `factor - 1`, computed in float32 and rounded once."""

    class Scaled(torch.nn.Module):
        kernel_layer_name = "RMSNorm"

        def forward(self, x):
            x32 = x.float()
            out = self.weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
            return (out * factor).to(x.dtype)

    Scaled.__name__ = f"Scaled{factor}"
    return Scaled


def norm_entries(plan):
    return [e for e in plan.entries if e.kind == "layer" and "norm" in e.path]


def test_a_wrong_kernel_is_refused_with_its_measured_error_and_nothing_changes(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    refused(model, kernelhub.BindError, ["conformance: max error 0.5 exceeds the tolerance 1e-05",
                                         "RMSNorm's reference (float32)"], kernels={"RMSNorm": TimesOnePointFive})


def test_in_a_chain_a_wrong_kernel_falls_back_and_the_plan_says_why(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    plan = kernelhub.bind(model, kernels={"RMSNorm": [TimesOnePointFive, SameNumbers]})
    for entry in norm_entries(plan):
        assert entry.chosen == "SameNumbers"
        (name, reasons), = entry.rejected
        assert name == "TimesOnePointFive" and "max error 0.5" in reasons[0]
        assert entry.note.startswith("max err") and "tol 1e-05" in entry.note


def test_verify_false_binds_a_wrong_kernel_and_it_runs(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        reference = model(ids).logits
        plan = kernelhub.bind(model, kernels={"RMSNorm": TimesOnePointFive}, verify=False)
        assert {e.chosen for e in norm_entries(plan)} == {"TimesOnePointFive"}
        assert all(e.note == "not verified (verify=False)" for e in norm_entries(plan))
        assert (model(ids).logits - reference).abs().max() > 1e-2
    reloaded = kernelhub.from_pretrained(tiny_checkpoint, kernels={"RMSNorm": TimesOnePointFive}, verify=False)
    assert {e.chosen for e in norm_entries(reloaded.binding)} == {"TimesOnePointFive"}


def test_a_correct_kernel_binds_and_the_plan_shows_its_error(tiny_checkpoint):
    plan = kernelhub.from_pretrained(tiny_checkpoint, kernels={"RMSNorm": SameNumbers}).binding
    errors = {e.note for e in norm_entries(plan)}
    assert len(errors) == 1 and errors.pop().startswith("max err ")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tolerance_per_dtype_holds_at_its_boundary(dtype):
    from kernelhub.declare.reference_layers import RMSNorm

    tolerance = TOLERANCE[dtype]
    inside = check_layer(scaled_kernel(1 + tolerance / 4).forward, RMSNorm(64), dtype, torch.device("cpu"))
    outside = check_layer(scaled_kernel(1 + 2.5 * tolerance).forward, RMSNorm(64), dtype, torch.device("cpu"))
    assert inside.ok and inside.error <= tolerance, inside
    assert not outside.ok and outside.error > tolerance, outside


def test_a_kernel_refused_before_the_probe_never_runs(tiny_checkpoint, marker):
    class CudaOnly(torch.nn.Module):
        kernel_layer_name = "RMSNorm"
        devices = ("cuda",)

        def forward(self, x):
            marker.write_text("ran")
            return x

    plan = kernelhub.from_pretrained(tiny_checkpoint, kernels={"RMSNorm": [CudaOnly, "reference"]}).binding
    assert {e.chosen for e in norm_entries(plan)} == {"reference"}
    assert not marker.exists(), "the probe ran a kernel its capabilities had already refused"


def test_an_untrusted_hub_kernel_is_refused_before_any_probe(tiny_checkpoint, tmp_path, monkeypatch, marker):
    repo = _wrong_norm_repo(tmp_path / "repo", marker)
    populate_hub_cache(tmp_path / "hf", "evil-org/rmsnorm", repo)
    from kernelhub.testing import point_hub_at

    point_hub_at(monkeypatch, None, tmp_path / "hf", offline=True)
    model = kernelhub.from_pretrained(tiny_checkpoint)
    refused(model, kernelhub.UntrustedKernelError, ["evil-org"], marker=marker,
            kernels={"RMSNorm": "evil-org/rmsnorm@v1:RMSNorm"})


def _wrong_norm_repo(path, marker=None):
    writes = f"        open({str(marker)!r}, 'w').write('ran')\n" if marker else ""
    source = ("class RMSNorm(torch.nn.Module):\n"
              "    def forward(self, x):\n"
              f"{writes}"
              "        x32 = x.float()\n"
              "        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)\n"
              "        return 1.5 * self.weight * out.to(x.dtype)\n")
    return write_kernel_repo(path, "rmsnorm", layers=[source])


def test_a_wrong_local_directory_kernel_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    _wrong_norm_repo(tmp_path / "wrong-norm")
    monkeypatch.chdir(tmp_path)
    model = kernelhub.from_pretrained(tiny_checkpoint)
    refused(model, kernelhub.BindError, ["max error 0.5"], kernels={"RMSNorm": "./wrong-norm:RMSNorm"})
    plan = kernelhub.bind(model, kernels={"RMSNorm": ["./wrong-norm:RMSNorm", "reference"]})
    assert {e.chosen for e in norm_entries(plan)} == {"reference"}


def test_a_wrong_hub_kernel_from_the_cache_is_refused(tiny_checkpoint, tmp_path, monkeypatch):
    from kernelhub.testing import point_hub_at

    populate_hub_cache(tmp_path / "hf", "kernelhub-test/wrong-norm", _wrong_norm_repo(tmp_path / "repo"))
    point_hub_at(monkeypatch, None, tmp_path / "hf", offline=True)
    monkeypatch.setenv("KERNELHUB_TRUSTED", "kernelhub-test")
    model = kernelhub.from_pretrained(tiny_checkpoint)
    refused(model, kernelhub.BindError, ["max error 0.5"], kernels={"RMSNorm": "kernelhub-test/wrong-norm@v1:RMSNorm"})


def test_a_wrong_attention_kernel_from_a_directory_is_refused_against_eager(tiny_checkpoint, tmp_path, monkeypatch):
    def half_attention(module, q, k, v, mask, *, scaling, dropout=0.0):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        return 0.5 * out.transpose(1, 2), None

    spec = {"attention": {"half_attention": {"mask_format": "bool", "capabilities": {"gqa": True}}},
            "default_attention": "half_attention"}
    write_kernel_repo(tmp_path / "half", "half", functions=[half_attention], kernelhub_json=spec)
    monkeypatch.chdir(tmp_path)
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    refused(model, kernelhub.BindError, ["conformance: max error", "against eager attention"], attn="./half")
    plan = kernelhub.bind(model, ["./half", "sdpa"])
    assert plan.chosen() == {"sdpa"}


F = torch.nn.functional


def test_a_hub_kernel_plan_entry_shows_its_verification_time_and_its_error(tiny_checkpoint, tmp_path, monkeypatch):
    from kernelhub.testing import point_hub_at

    norm = ("class RMSNorm(torch.nn.Module):\n"
            "    def forward(self, x):\n"
            "        x32 = x.float()\n"
            "        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)\n"
            "        return self.weight * out.to(x.dtype)\n")
    populate_hub_cache(tmp_path / "hf", "kernelhub-test/good-norm",
                       write_kernel_repo(tmp_path / "repo", "rmsnorm", layers=[norm]))
    point_hub_at(monkeypatch, None, tmp_path / "hf", offline=True)
    monkeypatch.setenv("KERNELHUB_TRUSTED", "kernelhub-test")
    plan = kernelhub.from_pretrained(tiny_checkpoint, kernels={"RMSNorm": "kernelhub-test/good-norm@v1"}).binding
    for entry in norm_entries(plan):
        assert "read and verified in" in entry.note and "max err" in entry.note, entry.note
