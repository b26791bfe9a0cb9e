"""Logging and progress bars: the binding summary, fallbacks once, plugin failures, verbosity, bars.

pytest's logging plugin is off in this project (`-p no:logging`), so `captured_logs` stands in for caplog.
"""

import io
import logging
import os
import subprocess
import sys

import pytest

import kernelhub
from kernelhub.declare import log
from kernelhub.declare.eager import eager_attention
from kernelhub.declare.errors import KernelhubError
from kernelhub.declare.log import captured_logs, parse_verbosity, progress
from kernelhub.checkpoint import hf_layout as checkpoint_module
from kernelhub.runtime.batching import generate_batch
from kernelhub.models.llama import LlamaForCausalLM

CONFIG = {"vocab_size": 32, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2}


@pytest.fixture(autouse=True)
def fresh_once():
    log.forget_once()
    yield
    log.forget_once()


@pytest.fixture
def bars_on(monkeypatch):
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)


def messages(records, level=None):
    return [r.getMessage() for r in records if level is None or r.levelno == level]


def cuda_only(name):
    """A backend that cannot serve a CPU site: every bind on CPU records one rejection."""
    return kernelhub.AttentionBackend(name, eager_attention, mask_format="bool",
                                      capabilities=kernelhub.Capabilities(devices=("cuda",)))


def test_a_bind_logs_its_summary_at_info_with_counts():
    model = LlamaForCausalLM(CONFIG)
    with captured_logs("info") as records:
        kernelhub.bind(model, attn_implementation="sdpa")
    (summary,) = messages(records, logging.INFO)
    assert summary.startswith("bound LlamaForCausalLM on cpu/float32 (inference): attention sdpa x2; ")
    assert "RMSNorm reference x5" in summary  # two per layer, plus the final norm
    assert not messages(records, logging.WARNING)


def test_the_summary_is_silent_at_the_default_level():
    with captured_logs("warning") as records:
        kernelhub.bind(LlamaForCausalLM(CONFIG), attn_implementation="sdpa")
    assert records == []


def test_each_fallback_reason_is_logged_once_across_binds_and_sites():
    kernelhub.register_backend(cuda_only("gpu_only"))
    kernelhub.register_backend(cuda_only("other_gpu_only"))
    with captured_logs("warning") as records:
        for _ in range(3):
            kernelhub.bind(LlamaForCausalLM(CONFIG), attn_implementation=["gpu_only", "sdpa"])
        kernelhub.bind(LlamaForCausalLM(CONFIG), attn_implementation={"model.layers.0.*": ["gpu_only", "eager"],
                                                                      "*": ["gpu_only", "sdpa"]})
        kernelhub.bind(LlamaForCausalLM(CONFIG), attn_implementation=["other_gpu_only", "sdpa"])
    warnings = messages(records, logging.WARNING)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("model.layers.{0..1}.self_attn.attn: gpu_only rejected: ")
    assert warnings[0].endswith("; using sdpa") and "cuda" in warnings[0]
    assert warnings[1].startswith("model.layers.{0..1}.self_attn.attn: other_gpu_only rejected: ")


def test_a_failing_plugin_is_a_warning_with_its_traceback_at_debug():
    class Broken:
        @kernelhub.hookimpl
        def kernelhub_attention_backends(self):
            raise RuntimeError("hook broken on purpose")

    registry = kernelhub.get_registry()
    with captured_logs("debug") as records:
        registry.add_plugin(Broken(), "broken-hook (dist)")
    (warning,) = [r for r in records if r.levelno == logging.WARNING]
    assert warning.name == "kernelhub.registry.plugins"
    assert "kernelhub plugin broken-hook (dist) failed: hook raised RuntimeError: hook broken on purpose" \
        in warning.getMessage() and "kernelhub plugins" in warning.getMessage()
    assert warning.exc_info is None  # the traceback is not for every user
    (debug,) = [r for r in records if r.levelno == logging.DEBUG and r.exc_info]
    assert "hook broken on purpose" in logging.Formatter().format(debug)
    assert "Traceback" in logging.Formatter().format(debug)
    assert [f.plugin for f in registry.failures] == ["broken-hook (dist)"]  # still listed by `kernelhub plugins`


@pytest.mark.parametrize("text, level", [("debug", 10), ("INFO", 20), (" Warning ", 30), ("error", 40),
                                         ("critical", 50), ("15", 15), ("0", 0), (25, 25)])
def test_verbosity_names_and_numbers(text, level):
    assert parse_verbosity(text) == level


@pytest.mark.parametrize("text", ["loud", "-1", "", "2.5", "warn ing", True])
def test_an_invalid_verbosity_names_the_variable_and_the_valid_values(text):
    with pytest.raises(KernelhubError) as info:
        parse_verbosity(text)
    message = str(info.value)
    assert message.startswith(f"KERNELHUB_VERBOSITY={text!r}")
    assert "debug, info, warning, error, critical" in message


def test_configure_reads_the_variable_and_defaults_to_warning():
    logger = logging.getLogger("kernelhub")
    old = logger.level
    try:
        log.configure({"KERNELHUB_VERBOSITY": "debug"})
        assert logger.level == logging.DEBUG and log.get_verbosity() == logging.DEBUG
        log.configure({})
        assert logger.level == logging.WARNING
        log.configure({})
        assert sum(isinstance(h, log._DefaultHandler) for h in logger.handlers) == 1  # added once
        with pytest.raises(KernelhubError, match="KERNELHUB_VERBOSITY='verbose' is not a verbosity"):
            log.configure({"KERNELHUB_VERBOSITY": "verbose"})
    finally:
        logger.setLevel(old)


def test_the_default_handler_writes_to_stderr_until_the_application_configures_logging(capsys, monkeypatch):
    # Start from an application that has configured nothing (other tests' libraries may have).
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    logger = logging.getLogger("kernelhub.test")
    logger.warning("first")
    assert "[kernelhub] WARNING kernelhub.test: first" in capsys.readouterr().err
    root_handler = logging.StreamHandler(io.StringIO())
    logging.getLogger().addHandler(root_handler)
    try:
        logger.warning("second")
    finally:
        logging.getLogger().removeHandler(root_handler)
    assert "second" not in capsys.readouterr().err  # only the application's handler has it
    assert "second" in root_handler.stream.getvalue()


def run_python(code, **env):
    environ = {**os.environ, "KERNELHUB_DISABLE_PLUGIN_AUTOLOAD": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ)


def test_kernelhub_verbosity_from_the_environment():
    code = ("import kernelhub\nfrom kernelhub.models.llama import LlamaForCausalLM\n"
            f"kernelhub.bind(LlamaForCausalLM({CONFIG!r}), 'sdpa')")
    out = run_python(code, KERNELHUB_VERBOSITY="info")
    assert out.returncode == 0, out.stderr
    assert "[kernelhub] INFO kernelhub.registry.bind: bound LlamaForCausalLM on cpu/float32" in out.stderr
    assert run_python(code).stderr == ""  # warning by default: a clean bind says nothing
    out = run_python("import kernelhub", KERNELHUB_VERBOSITY="loud")  # one line, no traceback, default kept
    assert out.returncode == 0 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "KERNELHUB_VERBOSITY='loud' is not a verbosity; valid: debug, info" in out.stderr
    assert out.stderr.strip().endswith("using warning")


def test_bars_are_off_when_hf_hub_disables_them_even_if_forced(monkeypatch):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    out = io.StringIO()
    assert sum(progress(range(3), desc="adding", disable=False, file=out)) == 3
    assert out.getvalue() == ""


def test_a_forced_bar_shows_when_hf_hub_does_not_disable_them(bars_on):
    out = io.StringIO()
    assert sum(progress(range(3), desc="adding", disable=False, file=out, leave=True)) == 3
    assert "adding" in out.getvalue() and "3/3" in out.getvalue()


def test_bars_default_to_terminals_only_and_follow_a_quiet_verbosity(bars_on):
    out = io.StringIO()  # not a terminal
    list(progress(range(3), desc="adding", file=out))
    assert out.getvalue() == ""
    logger = logging.getLogger("kernelhub")
    old = logger.level
    try:
        log.set_verbosity("error")
        list(progress(range(3), desc="adding", disable=False, file=out))
    finally:
        logger.setLevel(old)
    assert out.getvalue() == ""


def test_generate_batch_progress_counts_finished_requests(tiny_checkpoint, bars_on, capsys):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    quiet = generate_batch(model, prompts, max_new_tokens=3)
    assert "generating" not in capsys.readouterr().err  # progress=False by default
    results = generate_batch(model, prompts, max_new_tokens=3, progress=True)
    err = capsys.readouterr().err
    assert "generating" in err and f"{len(prompts)}/{len(prompts)}" in err
    assert [r.tokens for r in results] == [r.tokens for r in quiet]
    with pytest.raises(kernelhub.SamplingError):  # progress is generate_batch's own keyword, not a sampling one
        generate_batch(model, prompts, max_new_tokens=3, progres=True)


def test_generate_batch_progress_is_silenced_by_hf_hub(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    model = kernelhub.from_pretrained(tiny_checkpoint)
    generate_batch(model, [[1, 2]], max_new_tokens=2, progress=True)
    assert capsys.readouterr().err == ""


def test_weight_loading_bar_counts_every_byte(tiny_checkpoint, bars_on, monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(checkpoint_module, "progress",
                        lambda *a, **kw: progress(*a, **{**kw, "disable": False, "file": out, "leave": True}))
    state = checkpoint_module.read_state_dict(tiny_checkpoint)
    assert state and "loading weights" in out.getvalue() and "100%" in out.getvalue()
