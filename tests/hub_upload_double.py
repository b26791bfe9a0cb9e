"""A test double of the Hub's write API, on loopback, committing into the olah mirror.

It implements what `huggingface_hub` calls to publish a folder: create-repo, create
branch, README card validation, preupload (every file "regular", i.e. inline base64) and the NDJSON commit
endpoint. Each commit becomes a real git commit in the mirror's repository, so what was
uploaded can be downloaded back through olah and the real `kernels` code path.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.loopback_hub import git


class UploadDouble:
    def __init__(self, hub):
        self.hub = hub
        self.requests: list[str] = []
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, payload):
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                double.requests.append(self.path)
                try:
                    status, payload = double.handle(self.path, body)
                except Exception as e:  # noqa: BLE001 - report, do not drop the connection
                    status, payload = 500, {"error": f"{type(e).__name__}: {e}"}
                self._reply(status, payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()

    def handle(self, path: str, body: bytes):
        if path == "/api/validate-yaml":  # the README card's front matter; the Hub checks its schema
            card = json.loads(body).get("content", "")
            return (200, {}) if card.startswith("---\n") else (400, {"error": "the card has no YAML front matter"})
        if path == "/api/repos/create":
            data = json.loads(body)
            repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
            repo = self.hub.git_dir(repo_id)
            if not (repo / ".git").exists():
                repo.mkdir(parents=True)
                git(repo, "init", "-q")
                git(repo, "commit", "-q", "--allow-empty", "-m", "initial commit")
            return 200, {"url": f"{self.endpoint}/kernels/{repo_id}", "name": repo_id}
        match = re.fullmatch(r"/api/kernels/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if not match:
            return 404, {"error": f"the upload double does not implement {path}"}
        repo_id, action, revision = match.groups()
        repo = self.hub.git_dir(repo_id)
        if action == "branch":
            if revision not in git(repo, "branch", "--format=%(refname:short)").split():
                git(repo, "branch", revision, "main")
            return 200, {}
        if action == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        return 200, self._commit(repo_id, repo, revision, body)

    def _commit(self, repo_id: str, repo: Path, branch: str, body: bytes) -> dict:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        git(repo, "checkout", "-q", branch)
        for line in lines:
            if line["key"] == "file":
                dest = repo / line["value"]["path"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(base64.b64decode(line["value"]["content"]))
        summary = next(line["value"]["summary"] for line in lines if line["key"] == "header")
        git(repo, "add", "-A")
        git(repo, "commit", "-q", "--allow-empty", "-m", summary)
        commit = git(repo, "rev-parse", "HEAD")
        git(repo, "checkout", "-q", "main")
        return {"commitUrl": f"{self.endpoint}/kernels/{repo_id}/commit/{commit}", "commitOid": commit}
