"""Docs generated from code stay in sync with it."""

from pathlib import Path

import kernelhub
from kernelhub.cli.docs_gen import render

ROOT = Path(__file__).parent.parent


def test_capability_matrix_in_docs_is_current():
    text = (ROOT / "docs" / "attention.md").read_text()
    assert render(text, kernelhub.get_registry().backends()) == text, "run `make docs` to regenerate"


def test_readme_states_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_docs_site_builds_strictly(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for page in ("index.html", "attention/index.html", "plugins/index.html", "testing/index.html", "hub/index.html",
                 "publishing/index.html", "serving/index.html"):
        assert (tmp_path / page).is_file(), page
