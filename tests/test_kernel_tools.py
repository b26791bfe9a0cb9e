"""`kernelhub kernel build | check | publish`, with publishing through a loopback upload
double and the published files downloaded back through olah and compared byte for byte."""

import shutil

import pytest
import torch

import kernelhub
from kernelhub.cli.commands import main
from kernelhub.kernel.check import check_kernel
from kernelhub.kernel.publish import publish_kernel
from kernelhub.testing import write_kernel_repo
from tests.hub_test_kernels import HUB_KERNELS, OURS
from tests.hub_upload_double import UploadDouble


@pytest.mark.parametrize("name", OURS)
def test_our_hub_kernels_pass_check(name, capsys, tmp_path):
    repo = shutil.copytree(HUB_KERNELS / name, tmp_path / name, ignore=shutil.ignore_patterns("build", "__pycache__"))
    assert main(["kernel", "check", str(repo)]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert ("conforms to kernelhub" in out or "matches kernelhub" in out) and "PROBLEM" not in out
    assert not (repo / "build").exists(), "check must not write into the repo"
    assert main(["kernel", "build", str(repo)]) == 0
    assert sorted(p.name for p in (repo / "build").iterdir()) == ["torch-cpu", "torch-cuda", "torch-rocm", "torch-xpu"]


def test_check_reports_every_problem_of_a_broken_repo(tmp_path):
    class RMSNorm(torch.nn.Module):
        scale = 2.0  # extra members break the kernels layer contract

        def forward(self, x):
            return x * self.scale

    repo = write_kernel_repo(tmp_path / "broken", "broken", layers=[RMSNorm])
    (repo / "README.md").write_text("no card\n")
    (repo / "benchmarks" / "benchmark.py").unlink()
    problems = " | ".join(check_kernel(repo).problems)
    assert "front-matter card" in problems and "benchmarks/benchmark.py is missing" in problems
    assert "defines scale" in problems


def test_check_catches_a_kernel_that_computes_the_wrong_thing(tmp_path):
    class SiLUAndMul(torch.nn.Module):
        def forward(self, x):
            d = x.shape[-1] // 2
            return torch.nn.functional.gelu(x[..., :d]) * x[..., d:]

    report = check_kernel(write_kernel_repo(tmp_path / "wrong", "wrong", layers=[SiLUAndMul]))
    assert not report.ok and "SiLUAndMul: conformance: max error" in report.problems[0]


def test_publish_uploads_to_the_version_branch_and_downloads_back_byte_for_byte(hub, tmp_path, tiny_checkpoint):
    double = UploadDouble(hub)
    try:
        repo = shutil.copytree(HUB_KERNELS / "rmsnorm", tmp_path / "rmsnorm",
                               ignore=shutil.ignore_patterns("build", "__pycache__"))
        commit = publish_kernel(repo, "kernelhub-test/published-rmsnorm", version=3, endpoint=double.endpoint,
                                token="hf_kernelhub_test")  # the double accepts any token
    finally:
        double.stop()
    assert any(p.endswith("/preupload/v3") for p in double.requests)
    assert any(p.endswith("/commit/v3") for p in double.requests)
    model = kernelhub.from_pretrained(tiny_checkpoint)
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": "kernelhub-test/published-rmsnorm@v3"})
    assert f"hub kernelhub-test/published-rmsnorm@{commit} (RMSNorm)" in {e.source for e in plan.entries}
    snapshot = next((tmp_path / "hf-cache").glob(f"kernels--kernelhub-test--published-rmsnorm/snapshots/{commit}"))
    downloaded = sorted(p for p in (snapshot / "build" / "torch-cpu").rglob("*") if p.is_file() and
                        "__pycache__" not in p.parts)
    assert len(downloaded) == 4
    for path in downloaded:
        assert path.read_bytes() == (repo / path.relative_to(snapshot)).read_bytes(), path


def test_publish_refuses_bad_arguments(tmp_path):
    repo = shutil.copytree(HUB_KERNELS / "layernorm", tmp_path / "ln", ignore=shutil.ignore_patterns("build"))
    with pytest.raises(kernelhub.KernelhubError, match="takes 'org/name' only"):
        publish_kernel(repo, "org/name@v1", version=1, endpoint="http://127.0.0.1:9")
    with pytest.raises(kernelhub.KernelhubError, match="positive integer"):
        publish_kernel(repo, "org/name", version=0, endpoint="http://127.0.0.1:9")


def test_check_fails_a_layer_class_that_matches_no_declared_layer(tmp_path):
    from kernelhub.kernel.check import check_kernel
    from kernelhub.testing import write_kernel_repo

    source = ("class RmsNorm(torch.nn.Module):\n"
              "    def forward(self, x):\n"
              "        return x\n")
    report = check_kernel(write_kernel_repo(tmp_path / "typo", "typo", layers=[source]))
    assert not report.ok
    assert any("layers.RmsNorm matches no declared layer. Did you mean 'RMSNorm'?" in p for p in report.problems), \
        report.problems
