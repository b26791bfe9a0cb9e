"""Publishing rehearsal: `kernel publish --dry-run` checks, builds and lists the upload with no
network at all; a real publish without a token or without a reachable Hub fails in one line
before anything is uploaded."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernelhub
from kernelhub.kernel.publish import plan_publish, publish_kernel
from kernelhub.testing import write_kernel_repo

CLOSED_PORT = "http://127.0.0.1:9"  # discard port: nothing listens on loopback, connects are refused at once

# Runs the CLI with every way of opening a connection refused: a request would fail the run.
OFFLINE_CLI = """
import socket, sys
def refuse(*args, **kwargs):
    raise AssertionError("the dry run opened a network connection")
socket.socket.connect = socket.socket.connect_ex = socket.create_connection = socket.getaddrinfo = refuse
from kernelhub.cli.commands import main
sys.exit(main(sys.argv[1:]))
"""


class RMSNorm(torch.nn.Module):
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(dtype)


@pytest.fixture
def repo(tmp_path):
    return write_kernel_repo(tmp_path / "tiny-norm", "tiny-norm", layers=[RMSNorm])


def environment(tmp_path, **extra) -> dict:
    """No token anywhere (HF_HOME is empty), the Hub on a closed port, plugins off."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=CLOSED_PORT, KERNELHUB_DISABLE_PLUGIN_AUTOLOAD="1")
    return {**env, **extra}


def run(args, env, code=None):
    command = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "kernelhub", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


def files_on_disk(repo: Path) -> dict:
    return {p.relative_to(repo).as_posix(): p.stat().st_size for p in repo.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_dry_run_lists_every_file_the_branch_and_the_message_offline(repo, tmp_path):
    out = run(["kernel", "publish", str(repo), "--repo", "my-org/tiny-norm", "--version", "2", "--dry-run"],
              environment(tmp_path), code=OFFLINE_CLI)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"would publish {repo} to my-org/tiny-norm, branch v2 (created from main if missing)"
    assert lines[1] == "commit message: Publish tiny-norm v2 with kernelhub"
    listed = {line.split()[1]: int(line.split()[0].replace(",", "")) for line in lines[2:-1]}
    on_disk = files_on_disk(repo)
    assert listed == on_disk and "build/torch-cpu/metadata.json" in listed
    assert lines[-1] == f"{len(on_disk)} files, {sum(on_disk.values()):,} bytes; dry run: nothing was uploaded"


def test_publish_uploads_exactly_what_the_dry_run_lists(repo, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("network")))
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("repo", repo_id, kw)))
    monkeypatch.setattr(HfApi, "create_branch", lambda self, repo_id, **kw: calls.append(("branch", kw["branch"])))

    def create_commit(self, repo_id, operations, **kw):
        calls.append(("commit", kw["revision"], kw["commit_message"], sorted(op.path_in_repo for op in operations)))
        return type("CommitInfo", (), {"oid": "0" * 40})()

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    plan = plan_publish(repo, "my-org/tiny-norm")
    assert publish_kernel(repo, "my-org/tiny-norm", token="hf_kernelhub_test") == "0" * 40
    assert calls[0][:2] == ("repo", "my-org/tiny-norm") and calls[0][2]["repo_type"] == "kernel"
    assert calls[1] == ("branch", "v1")
    assert calls[2] == ("commit", "v1", plan.message, [path for path, _ in plan.files])


def test_publish_without_a_token_fails_in_one_line_before_any_request(repo, tmp_path):
    out = run(["kernel", "publish", str(repo), "--repo", "my-org/tiny-norm"], environment(tmp_path), code=OFFLINE_CLI)
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert out.returncode != 0 and len(out.stderr.splitlines()) == 1, out.stderr
    assert out.stderr.startswith("kernelhub: error: publishing my-org/tiny-norm needs a Hugging Face token")
    assert "HF_TOKEN" in out.stderr and "--dry-run" in out.stderr


def test_publish_to_an_unreachable_hub_fails_in_one_line(repo, tmp_path):
    out = run(["kernel", "publish", str(repo), "--repo", "my-org/tiny-norm"],
              environment(tmp_path, HF_TOKEN="hf_kernelhub_test"))
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert out.returncode != 0 and len(out.stderr.splitlines()) == 1, out.stderr
    line = out.stderr.strip()
    assert line.startswith("kernelhub: error: publishing my-org/tiny-norm: cannot create the repo")
    assert f"the Hub at {CLOSED_PORT} is unreachable" in line and "Nothing was uploaded" in line


def test_bad_publish_arguments_are_one_line(repo, tmp_path):
    out = run(["kernel", "publish", str(repo), "--repo", "my-org/tiny-norm@v1", "--dry-run"], environment(tmp_path))
    assert out.returncode == 2 and out.stderr.splitlines() == [
        "kernelhub: error: --repo takes 'org/name' only, got 'my-org/tiny-norm@v1'; pass the version with --version"]
    with pytest.raises(kernelhub.KernelhubError, match="does not exist"):
        plan_publish(tmp_path / "missing", "my-org/x")
