"""The command line never dumps a traceback: every failure is one line on stderr,
`kernelhub: error: ...`, exit 2 for bad input and 1 otherwise; `--debug` shows the traceback."""

import argparse
import os
import subprocess
import sys

import pytest

import kernelhub
from gguf_files import write_tiny_gguf
from kernelhub.cli.commands import build_parser, main
from kernelhub.cli.args import parse_request
from kernelhub.registry.hub.ref import parse_kernel_ref

HUB_SUBCOMMANDS = ("backends", "plugins", "explain", "demo", "run", "lock", "download", "kernel")


def cli(*args, cwd=None, code=None, stdout=subprocess.PIPE, env=None):
    """Run `python -m kernelhub ARGS` (or `python -c CODE`) as a user would; plugins off for a quiet stderr."""
    env = dict(os.environ, KERNELHUB_DISABLE_PLUGIN_AUTOLOAD="1", **(env or {}))
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "kernelhub", *args]
    return subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env, timeout=120)


def one_line_error(out, status: int, *phrases) -> str:
    """Assert a failure reported as exactly one `kernelhub: error:` line; returns that line."""
    assert "Traceback" not in out.stderr + (out.stdout or ""), out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("kernelhub: error: "), lines[0]
    assert out.returncode == status, (out.returncode, lines[0])
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def test_version():
    out = cli("--version")
    assert out.returncode == 0 and out.stdout == f"kernelhub {kernelhub.__version__}\n" and not out.stderr


def test_help_lists_every_subcommand_with_its_description():
    out = cli("--help")
    assert out.returncode == 0 and not out.stderr
    for name in (*HUB_SUBCOMMANDS, "diff"):
        assert f"    {name} " in out.stdout, name


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("path", [*HUB_SUBCOMMANDS[:-1], "kernel build", "kernel check", "kernel publish"])
def test_every_subcommand_has_a_description_and_every_option_help(path):
    parser = build_parser()
    for word in path.split():
        parser = _subparsers(parser)[word]
    assert parser.description and len(parser.description) > 20, path
    for action in parser._actions:
        assert action.help, f"{path}: {action.option_strings or action.dest} has no help"


def test_help_lists_choices():
    text = _subparsers(build_parser())["explain"].format_help()
    for value in ("float32", "bfloat16", "float16", "inference", "training", "training|compile"):
        assert value in text
    assert "key=value" in text


def test_each_kernel_action_has_only_its_own_options():
    out = cli("kernel", "build", "--help")
    assert out.returncode == 0 and "DIR" in out.stdout
    for option in ("--repo", "--dry-run", "--version"):
        assert option not in out.stdout
    publish = _subparsers(_subparsers(build_parser())["kernel"])["publish"].format_help()
    assert all(option in publish for option in ("--repo", "--dry-run", "--version"))


def test_usage_errors_are_one_line():
    one_line_error(cli("kernel", "publish", "somewhere"), 2, "--repo", "kernelhub kernel publish --help")


def test_bad_json_is_one_line(tiny_checkpoint):
    one_line_error(cli("explain", str(tiny_checkpoint), "--attn", "{sliding: flex}"), 2,
                   "argument --attn", "not valid JSON", "key=value")


@pytest.mark.parametrize("text, option, expected", [
    ("sdpa", "--attn", "sdpa"),
    ("paged|flex", "--attn", "paged|flex"),
    ("org/attn@v1:fn", "--attn", "org/attn@v1:fn"),
    ('["flash", "sdpa"]', "--attn", ["flash", "sdpa"]),
    ("sliding_attention=flex, *=sdpa", "--attn", {"sliding_attention": "flex", "*": "sdpa"}),
    ("RMSNorm=org/rmsnorm@v1:RMSNorm,Linear=onednn", "--kernels",
     {"RMSNorm": "org/rmsnorm@v1:RMSNorm", "Linear": "onednn"}),
    ('{"RMSNorm": ["org/rmsnorm@v1", "reference"]}', "--kernels", {"RMSNorm": ["org/rmsnorm@v1", "reference"]}),
])
def test_request_values_parse(text, option, expected):
    assert parse_request(text, option) == expected


@pytest.mark.parametrize("text, option, phrase", [
    ("{sliding: flex}", "--attn", "not valid JSON"),
    ("flash,sdpa", "--attn", "neither JSON nor key=value"),
    ("RMSNorm", "--kernels", "neither JSON nor key=value"),
    ('["a"]', "--kernels", "is a JSON list"),
    ("a=1,b", "--kernels", "'b' in 'a=1,b' is not a key=value pair"),
    ("a=1,a=2", "--kernels", "'a' appears twice"),
    ("a=", "--attn", "not a key=value pair"),
    ("", "--attn", "empty"),
])
def test_bad_request_values_say_what_to_write(text, option, phrase):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse_request(text, option)
    assert phrase in str(info.value)


def test_key_value_pairs_bind_end_to_end(tiny_checkpoint):
    out = cli("explain", str(tiny_checkpoint), "--attn", "full_attention=eager,*=sdpa", "--kernels",
              "RMSNorm=reference", "--json")
    assert out.returncode == 0 and not out.stderr, out.stderr
    assert '"chosen": "eager"' in out.stdout


def test_max_new_tokens_zero_is_one_line(tiny_checkpoint):
    one_line_error(cli("run", str(tiny_checkpoint), "--prompt", "hi", "--max-new-tokens", "0"), 2,
                   "--max-new-tokens", "positive integer")


def test_lock_from_a_gguf_reads_its_metadata_and_says_there_is_nothing_to_lock(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    line = one_line_error(cli("lock", "--from-model", str(path), "-o", str(tmp_path / "k.lock")), 2, "GGUF")
    assert "nothing to lock" in line and "Decode" not in line
    assert not (tmp_path / "k.lock").exists()


def test_a_missing_checkpoint_is_one_line_and_debug_shows_the_traceback(tmp_path):
    one_line_error(cli("explain", str(tmp_path / "nope")), 2, "does not exist")
    out = cli("explain", str(tmp_path / "nope"), "--debug")
    assert out.returncode == 2 and "Traceback" in out.stderr and "CheckpointError" in out.stderr


def _patched(exception: str, *args) -> str:
    """Python code that makes `kernelhub backends` raise `exception`, then runs the CLI."""
    return ("import sys, kernelhub.cli.commands as cli\n"
            "def boom(args):\n"
            f"    raise {exception}\n"
            "cli.cmd_backends = boom\n"
            f"sys.exit(cli.main(['backends', *{list(args)!r}]))\n")


def test_an_unexpected_exception_is_one_internal_error_line():
    one_line_error(cli(code=_patched("RuntimeError('boom\\nsecond line')")), 1,
                   "internal error: RuntimeError: boom; second line (run with --debug for the traceback)")
    out = cli(code=_patched("RuntimeError('boom')", "--debug"))
    assert out.returncode == 1 and "Traceback" in out.stderr and "RuntimeError: boom" in out.stderr


def test_os_errors_exit_1_and_interrupts_exit_130_quietly():
    one_line_error(cli(code=_patched("FileNotFoundError(2, 'No such file or directory', 'x.lock')")), 1,
                   "x.lock: No such file or directory")
    out = cli(code=_patched("KeyboardInterrupt()"))
    assert out.returncode == 130 and out.stderr == ""


def test_a_closed_pipe_is_quiet(tiny_checkpoint):
    # the reader is gone before the first write: the write fails with EPIPE for certain
    proc = subprocess.Popen([sys.executable, "-m", "kernelhub", "explain", str(tiny_checkpoint), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, KERNELHUB_DISABLE_PLUGIN_AUTOLOAD="1"))
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert err == "" and proc.returncode != 0


def test_a_directory_without_dot_slash_is_an_error_not_a_hub_guess(tmp_path, tiny_checkpoint, monkeypatch):
    (tmp_path / "hub_kernels" / "rmsnorm").mkdir(parents=True)
    one_line_error(cli("explain", str(tiny_checkpoint), "--kernels", "RMSNorm=hub_kernels/rmsnorm", cwd=tmp_path), 2,
                   "a directory hub_kernels/rmsnorm exists; write ./hub_kernels/rmsnorm")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(kernelhub.KernelhubError, match="write ./hub_kernels/rmsnorm:RMSNorm"):
        parse_kernel_ref("hub_kernels/rmsnorm:RMSNorm", "kernels")
    assert parse_kernel_ref("./hub_kernels/rmsnorm", "kernels").path.name == "rmsnorm"
    assert parse_kernel_ref("other/rmsnorm", "kernels").repo_id == "other/rmsnorm"  # no such directory: Hub


def test_an_unbuilt_kernel_directory_says_to_build_it(tmp_path, tiny_checkpoint):
    (tmp_path / "norm").mkdir()
    line = one_line_error(cli("explain", str(tiny_checkpoint), "--kernels", "RMSNorm=./norm", cwd=tmp_path), 2,
                          "not built", f"run `kernelhub kernel build {tmp_path / 'norm'}` first")
    assert ":." not in line


def test_main_returns_statuses_to_callers(capsys):
    assert main(["explain"]) == 2
    assert capsys.readouterr().err.startswith("kernelhub: error: the following arguments are required: model")
