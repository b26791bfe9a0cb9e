"""A checkpoint cannot choose code: the binding request `save_pretrained` records in config.json is
shown in the plan, and applied only when the user passes kernels="from_config"."""

import json
import subprocess
import sys

import pytest
import torch

import kernelhub
from kernelhub.testing import write_kernel_repo


def _evil_kernel(path, marker):
    """A kernel repo whose import writes `marker` (and whose RMSNorm is otherwise correct)."""
    norm = ("class RMSNorm(torch.nn.Module):\n"
            "    def forward(self, x):\n"
            "        x32 = x.float()\n"
            "        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)\n"
            "        return self.weight * out.to(x.dtype)\n")
    return write_kernel_repo(path, "rmsnorm", layers=[norm], init_source=f"open({str(marker)!r}, 'w').write('ran')\n")


@pytest.fixture
def poisoned(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint whose config.json records a kernel shipped inside it."""
    ckpt = tmp_path / "mymodel"
    ckpt.mkdir()
    for f in tiny_checkpoint.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "MARKER"
    _evil_kernel(ckpt / "kern", marker)
    config = json.loads((ckpt / "config.json").read_text())
    config["kernelhub"] = {"kernels": {"RMSNorm": str(ckpt / "kern") + ":RMSNorm"},
                           "attn_implementation": str(ckpt / "kern") + ":attention"}
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt, marker


def test_a_recorded_kernel_is_shown_not_imported(poisoned):
    ckpt, marker = poisoned
    model = kernelhub.from_pretrained(ckpt)
    assert not marker.exists(), "loading imported a kernel the checkpoint named"
    assert {e.chosen for e in model.binding.entries if e.kind == "layer"} == {"reference"}
    assert model.binding.chosen() == {"sdpa"}
    assert "not applied" in str(model.binding) and "from_config" in str(model.binding)
    plan = kernelhub.explain(ckpt)
    assert not marker.exists(), "explain imported a kernel the checkpoint named"
    assert any("not applied" in n for n in plan.notes)


def test_cli_explain_imports_no_kernel_the_checkpoint_names(poisoned, tmp_path):
    ckpt, marker = poisoned
    out = subprocess.run([sys.executable, "-m", "kernelhub", "explain", str(ckpt)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not marker.exists()
    assert "not applied" in out.stdout


def test_from_config_applies_it_and_a_relative_path_is_the_checkpoints_not_the_cwds(poisoned, tmp_path, monkeypatch):
    ckpt, marker = poisoned
    config = json.loads((ckpt / "config.json").read_text())
    config["kernelhub"] = {"kernels": {"RMSNorm": "./kern:RMSNorm"}}
    (ckpt / "config.json").write_text(json.dumps(config))
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    cwd_marker = tmp_path / "CWD_MARKER"
    _evil_kernel(cwd / "kern", cwd_marker)  # a ./kern in the working directory must not be the one used
    monkeypatch.chdir(cwd)
    model = kernelhub.from_pretrained(ckpt, kernels="from_config")
    assert marker.exists(), "the opted-in kernel from the checkpoint should have been imported"
    assert not cwd_marker.exists(), "a recorded relative path was resolved against the working directory"
    norms = {e.source for e in model.binding.entries if e.kind == "layer" and "norm" in e.path}
    assert all(str(ckpt / "kern") in s for s in norms), norms


def test_a_recorded_hub_kernel_applied_from_config_still_needs_trust(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    for f in tiny_checkpoint.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    config = json.loads((ckpt / "config.json").read_text())
    config["kernelhub"] = {"kernels": {"RMSNorm": "evil-org/rmsnorm@v1:RMSNorm"}}
    (ckpt / "config.json").write_text(json.dumps(config))
    assert kernelhub.from_pretrained(ckpt).binding is not None  # held back: loads, plan says so
    with pytest.raises(kernelhub.UntrustedKernelError, match="evil-org"):
        kernelhub.from_pretrained(ckpt, kernels="from_config")


def test_a_bad_kernels_string_names_the_valid_forms(tiny_checkpoint):
    with pytest.raises(kernelhub.KernelhubError, match="'from_config' to apply the request"):
        kernelhub.from_pretrained(tiny_checkpoint, kernels="from-config")


def test_save_and_reload_keeps_registered_attention_and_holds_back_kernels(tiny_checkpoint, tmp_path):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager",
                                      kernels={"RMSNorm": "reference"})
    model.save_pretrained(tmp_path / "saved")
    reloaded = kernelhub.from_pretrained(tmp_path / "saved")
    assert reloaded.binding.chosen() == {"eager"}  # a registered name runs no checkpoint code
    assert any("not applied" in n for n in reloaded.binding.notes)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
