"""A Hub-compatible server on loopback: `olah` serving git repositories as a Hub mirror.

Each repo is a real git repository under `mirrors/<type>/<org>/<name>` (`kernels` for kernel
repos, `models` for model checkpoints) with real branches (`main`, `v1`, ...); olah answers
the Hub API (refs, revision info, tree listings, file resolve) from them, so the real
`kernels` / `huggingface_hub` code resolves versions, branches and commit pins against it
exactly as against huggingface.co.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

GIT = ["git", "-c", "user.name=kernelhub-tests", "-c", "user.email=tests@kernelhub.invalid",
       "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(repo: Path, *args) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


class LoopbackHub:
    """olah on 127.0.0.1 with a mirrors directory we commit kernel repos into."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout: float = 60.0) -> "LoopbackHub":
        for repo_type in ("kernels", "models"):
            (self.mirrors / repo_type).mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.port}\nrepos-path = "{self.root / "repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\nmetadata-cache-ttl = 0\n'
            "[accessibility]\noffline = true\n")
        self.log = open(self.root / "olah.log", "w")
        self.process = subprocess.Popen([sys.executable, "-c", "from olah.server import cli; cli()", "-c", str(config)],
                                        cwd=self.root, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited: {(self.root / 'olah.log').read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("olah did not start listening in time")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.log.close()

    def git_dir(self, repo_id: str, repo_type: str = "kernels") -> Path:
        return self.mirrors / repo_type / repo_id

    def publish(self, repo_id: str, source: Path, *, branches=("main", "v1"), repo_type: str = "kernels") -> str:
        """Commit the contents of `source` (a built kernel repo, or a model checkpoint with
        `repo_type="models"`) on `main` and point `branches` at that commit."""
        repo = self.git_dir(repo_id, repo_type)
        if not (repo / ".git").exists():
            repo.mkdir(parents=True)
            git(repo, "init", "-q")
        else:
            git(repo, "checkout", "-q", "main")
        for child in repo.iterdir():
            if child.name != ".git":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        shutil.copytree(source, repo, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "--allow-empty", "-m", f"publish {repo_id}")
        commit = git(repo, "rev-parse", "HEAD")
        for branch in branches:
            if branch != "main":
                git(repo, "branch", "-f", branch, commit)
        return commit

    def publish_model(self, repo_id: str, revisions: dict) -> dict:
        """A model repo whose branches hold different checkpoints: `{"v1": dir_a, "main": dir_b}`
        commits each directory in order (each on `main`, then its branch points there); returns
        {branch: commit}."""
        commits = {}
        for branch, source in revisions.items():
            commits[branch] = self.publish(repo_id, source, branches=("main", branch), repo_type="models")
        return commits
