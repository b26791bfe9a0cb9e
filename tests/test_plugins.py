"""Plugins: a backend registered in a test, and one shipped by a real installed distribution."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernelhub
from kernelhub.cli import commands as cli
from kernelhub.declare.eager import eager_attention
from kernelhub.declare.log import captured_logs

PLUGIN_DIR = Path(__file__).parent / "plugins" / "kernelhub-test-backend"


@pytest.fixture(scope="session")
def installed_plugin(tmp_path_factory):
    """pip-install the tiny plugin distribution into a private directory (real dist-info, real entry points)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(PLUGIN_DIR)], check=True)
    return target


@pytest.fixture
def plugin_on_path(installed_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_plugin))
    yield installed_plugin
    for name in [m for m in sys.modules if m.startswith("kernelhub_test_backend")]:
        del sys.modules[name]


def tokens():
    return torch.tensor([[5, 6, 7, 8, 9]])


def test_backend_registered_in_a_test_binds_and_runs(tiny_checkpoint, capsys):
    calls = []

    def counting(module, q, k, v, mask, *, scaling, **kw):
        calls.append(mask.shape)
        return eager_attention(module, q, k, v, mask, scaling=scaling, **kw)

    kernelhub.register_backend(kernelhub.AttentionBackend("counting", counting, mask_format="bool"))
    assert "counting" in [b.name for b in kernelhub.backends()]
    assert cli.main(["backends"]) == 0
    assert any(line.startswith("counting ") and line.endswith("available")
               for line in capsys.readouterr().out.splitlines())
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="counting")
    reference = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()).logits, reference(tokens()).logits)
    assert len(calls) == 4  # one call per layer, mask built once and shared
    assert model.binding.chosen() == {"counting"}
    assert model.binding.entries[0].source == "runtime"


def test_installed_distribution_appears_binds_and_runs(plugin_on_path, tiny_checkpoint):
    with captured_logs("warning") as records, kernelhub.scoped_registry(fresh=True, autoload=True) as registry:
        assert "plugin_sdpa" in [b.name for b in kernelhub.backends()]
        model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="plugin_attention",
                                          kernels={"RMSNorm": "doubled"}, verify=False)
        entry = model.binding["model.layers.0.self_attn.attn"]
        assert entry.chosen == "plugin_sdpa" and entry.source == "doubled_sdpa (kernelhub-test-backend)"
        assert model.binding["model.norm"].chosen == "doubled"
        assert model.binding["model.norm"].source == "doubled_sdpa (kernelhub-test-backend) (RMSNorm)"
        reference = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
        with torch.no_grad():
            ours = model(tokens()).logits
            kernelhub.bind(model, "plugin_sdpa")  # rebinding without kernels returns the norms to reference
            torch.testing.assert_close(model(tokens()).logits, reference(tokens()).logits)
        assert not torch.allclose(ours, reference(tokens()).logits)
    assert any(r.levelname == "WARNING" and "broken on purpose" in r.getMessage() for r in records)
    failures = {f.plugin: f.error for f in registry.failures}
    assert "broken (kernelhub-test-backend)" in failures
    assert "broken on purpose" in failures["broken (kernelhub-test-backend)"]


def run_cli(*args, pythonpath=None):
    env = {k: v for k, v in os.environ.items() if k != "KERNELHUB_DISABLE_PLUGIN_AUTOLOAD"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-m", "kernelhub", *args], capture_output=True, text=True, env=env)


def test_cli_lists_plugin_backend_and_reports_the_broken_plugin(installed_plugin):
    out = run_cli("backends", pythonpath=installed_plugin)
    assert out.returncode == 0, out.stderr
    assert "plugin_sdpa" in out.stdout and "doubled_sdpa (kernelhub-test-backend)" in out.stdout
    assert "sdpa" in out.stdout and "flex" in out.stdout
    out = run_cli("plugins", pythonpath=installed_plugin)
    assert "doubled_sdpa (kernelhub-test-backend)" in out.stdout
    assert "broken (kernelhub-test-backend): import of 'kernelhub_test_backend.broken' failed" in out.stdout
    assert run_cli("plugins", "--strict", pythonpath=installed_plugin).returncode == 1


def test_autoload_can_be_disabled(installed_plugin):
    env = dict(os.environ, PYTHONPATH=str(installed_plugin), KERNELHUB_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run([sys.executable, "-m", "kernelhub", "backends"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "plugin_sdpa" not in out.stdout


def test_selection_policy_hook_picks_among_fitting_candidates(tiny_checkpoint):
    class PreferEager:
        @kernelhub.hookimpl
        def kernelhub_select_backend(self, site, candidates, device, dtype, mode):
            return "eager" if "eager" in candidates else None

    kernelhub.get_registry().add_plugin(PreferEager(), "prefer-eager")
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation=["sdpa", "eager"])
    assert model.binding.chosen() == {"eager"}
    assert model.binding.entries[0].note == "selected by policy hook"


def test_two_plugins_registering_one_name_are_reported_naming_both():
    def plugin_providing(fn):
        class Plugin:
            @kernelhub.hookimpl
            def kernelhub_attention_backends(self):
                return [kernelhub.AttentionBackend("dup", fn, mask_format="bool")]
        return Plugin()

    registry = kernelhub.get_registry()
    registry.add_plugin(plugin_providing(eager_attention), "first (dist-one)")
    with captured_logs("warning") as records:
        registry.add_plugin(plugin_providing(lambda *a, **k: None), "second (dist-two)")
    assert [r.getMessage() for r in records if "'dup' from second (dist-two) is already registered by first "
            "(dist-one)" in r.getMessage()]
    assert registry.get("dup").backend.fn is eager_attention  # the first registration is kept
    assert any(f.plugin == "second (dist-two)" for f in registry.failures)
