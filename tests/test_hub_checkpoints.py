"""`from_pretrained("org/name")`: model checkpoints downloaded from a Hub (olah on loopback), as
transformers users expect: revisions, gguf_file=, offline from the cache, no remote code, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernelhub
from gguf_files import write_tiny_gguf
from kernelhub.testing import point_hub_at
from kernelhub.testing.samples import write_random_checkpoint

ORG = "kernelhub-test"
LLAMA, GGUF, EVIL = f"{ORG}/tiny-llama", f"{ORG}/tiny-gguf", f"{ORG}/evil-llama"
IDS = torch.tensor([[1, 5, 7, 9, 3]])


def write_tokenizer(path: Path, vocab_size: int = 256) -> None:
    """A word-level tokenizer over 'w0'..'wN' whose ids fit the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))


def llama(path: Path, seed: int) -> Path:
    write_random_checkpoint(path, seed=seed)
    write_tokenizer(path)
    (path / "README.md").write_text("a tiny random llama\n")
    return path


@pytest.fixture(scope="module")
def model_hub(tmp_path_factory):
    """olah serving three model repos: tiny-llama (v1 and main differ), tiny-gguf, evil-llama."""
    from tests.loopback_hub import LoopbackHub

    root = tmp_path_factory.mktemp("model-hub")
    server = LoopbackHub(root / "server").start()
    src = root / "sources"
    server.local = {"v1": llama(src / "v1", seed=0), "main": llama(src / "main", seed=1)}
    server.publish_model(LLAMA, server.local)
    (src / "gguf").mkdir()
    server.local["gguf"] = write_tiny_gguf(src / "gguf" / "tiny-f32.gguf")
    server.publish(GGUF, src / "gguf", branches=("main",), repo_type="models")
    # a repo that asks for remote code: modeling_evil.py would write the marker if ever imported
    server.marker = root / "EVIL-RAN"
    evil, custom = llama(src / "evil", seed=2), llama(src / "custom", seed=2)
    for folder, model_type in ((evil, "llama"), (custom, "evil_model")):
        (folder / "modeling_evil.py").write_text(f"open({str(server.marker)!r}, 'w').write('ran')\n")
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type=model_type, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"},
                      trust_remote_code=True)
        (folder / "config.json").write_text(json.dumps(config))
    server.publish_model(EVIL, {"custom": custom, "main": evil})
    yield server
    server.stop()


@pytest.fixture
def hub(model_hub, monkeypatch, tmp_path):
    """This test's endpoint is the loopback Hub, with an empty HF cache; online."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path / "kernelhub-cache"))
    point_hub_at(monkeypatch, model_hub.endpoint, tmp_path / "hf-cache")
    model_hub.cache = tmp_path / "hf-cache"
    return model_hub


def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def cached_files(cache: Path, repo_id: str) -> set[str]:
    root = cache / f"models--{repo_id.replace('/', '--')}"
    return {p.name for p in root.rglob("*") if p.is_file() or p.is_symlink()} if root.exists() else set()


def test_a_hub_id_loads_the_same_model_as_its_local_folder(hub):
    model = kernelhub.from_pretrained(LLAMA, attn_implementation="sdpa")
    torch.testing.assert_close(logits(model), logits(kernelhub.from_pretrained(hub.local["main"])), rtol=0, atol=0)
    snapshot = next((hub.cache / "models--kernelhub-test--tiny-llama" / "snapshots").iterdir())
    # weights and tokenizer only: no README.md
    assert {p.name for p in snapshot.iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}
    assert kernelhub.load_tokenizer(LLAMA, model=model)("w3 w4")["input_ids"] == [3, 4]


def test_a_revision_gets_that_revision_s_weights(hub):
    v1 = logits(kernelhub.from_pretrained(hub.local["v1"]))
    assert not torch.equal(v1, logits(kernelhub.from_pretrained(hub.local["main"])))
    torch.testing.assert_close(logits(kernelhub.from_pretrained(f"{LLAMA}@v1")), v1, rtol=0, atol=0)
    torch.testing.assert_close(logits(kernelhub.from_pretrained(LLAMA, revision="v1")), v1, rtol=0, atol=0)
    with pytest.raises(kernelhub.KernelhubError, match="names revision 'v1' but revision='main'"):
        kernelhub.from_pretrained(f"{LLAMA}@v1", revision="main")


def test_a_gguf_file_in_a_repo(hub):
    model = kernelhub.from_pretrained(GGUF, gguf_file="tiny-f32.gguf", dequantize=True)
    local = kernelhub.from_pretrained(hub.local["gguf"], dequantize=True)
    ids = torch.tensor([[1, 5, 3, 7]])  # the tiny GGUF has 8 tokens
    torch.testing.assert_close(logits(model, ids), logits(local, ids), rtol=0, atol=0)
    assert kernelhub.explain(GGUF, gguf_file="tiny-f32.gguf", attn_implementation="eager",
                             dequantize=True).chosen() == {"eager"}
    assert kernelhub.load_tokenizer(GGUF, gguf_file="tiny-f32.gguf").vocab_size == 8
    with pytest.raises(kernelhub.CheckpointError, match=r"has no file 'tiny-f23.gguf'; its .gguf files: "
                       r"tiny-f32.gguf. Did you mean 'tiny-f32.gguf'\?"):
        kernelhub.from_pretrained(GGUF, gguf_file="tiny-f23.gguf", dequantize=True)
    with pytest.raises(kernelhub.CheckpointError, match="has no config.json; it holds GGUF files: pass gguf_file= "
                       "one of tiny-f32.gguf"):
        kernelhub.from_pretrained(GGUF)


def test_explain_downloads_the_config_only(hub):
    plan = kernelhub.explain(f"{LLAMA}@v1", attn_implementation="eager")
    assert plan.chosen() == {"eager"}
    snapshots = list((hub.cache / "models--kernelhub-test--tiny-llama" / "snapshots").iterdir())
    assert [sorted(p.name for p in snapshot.iterdir()) for snapshot in snapshots] == [["config.json"]]
    assert not any(p.name.endswith(".safetensors") for p in hub.cache.rglob("*"))


def test_offline_loads_from_the_cache_and_names_what_is_missing(hub, monkeypatch):
    online = logits(kernelhub.from_pretrained(LLAMA))
    point_hub_at(monkeypatch, "http://127.0.0.1:9", hub.cache, offline=True)  # nothing listens there
    torch.testing.assert_close(logits(kernelhub.from_pretrained(LLAMA)), online, rtol=0, atol=0)
    with pytest.raises(kernelhub.CheckpointError, match=r"^offline \(HF_HUB_OFFLINE=1\): Hub checkpoint "
                       r"kernelhub-test/tiny-gguf@main file 'tiny-f32.gguf' is not in the Hugging Face cache"):
        kernelhub.from_pretrained(GGUF, gguf_file="tiny-f32.gguf")
    with pytest.raises(kernelhub.CheckpointError, match="offline .*kernelhub-test/tiny-llama@v1 is not in the"):
        kernelhub.from_pretrained(LLAMA, revision="v1")


def test_offline_after_explain_names_the_missing_weights(hub, monkeypatch):
    kernelhub.explain(LLAMA)  # config.json only
    point_hub_at(monkeypatch, "http://127.0.0.1:9", hub.cache, offline=True)
    assert kernelhub.explain(LLAMA).chosen()  # the plan needs nothing more
    with pytest.raises(kernelhub.CheckpointError, match=r"tiny-llama@main is not in the Hugging Face cache \(or "
                       r"only part of it\)"):
        kernelhub.from_pretrained(LLAMA)


def test_local_files_only_and_the_environment_variable(hub, monkeypatch):
    with pytest.raises(kernelhub.CheckpointError, match="^local_files_only=True: Hub checkpoint "
                       "kernelhub-test/tiny-llama@main is not in"):
        kernelhub.from_pretrained(LLAMA, local_files_only=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: still honoured
    with pytest.raises(kernelhub.CheckpointError, match="offline"):
        kernelhub.explain(LLAMA)


def test_remote_code_is_never_downloaded_or_run(hub):
    model = kernelhub.from_pretrained(EVIL)  # model_type llama: the auto_map is ignored
    assert type(model).__module__ == "kernelhub.models.llama"
    with pytest.raises(kernelhub.CheckpointError, match="unsupported model_type 'evil_model'"):
        kernelhub.from_pretrained(EVIL, revision="custom")
    with pytest.raises(kernelhub.CheckpointError, match="unsupported model_type 'evil_model'"):
        kernelhub.explain(f"{EVIL}@custom")
    kernelhub.load_tokenizer(EVIL)
    files = cached_files(hub.cache, EVIL)
    assert "config.json" in files and not any(name.endswith(".py") for name in files), files
    assert not hub.marker.exists()


def test_missing_repos_and_revisions_are_one_clear_error(hub):
    with pytest.raises(kernelhub.CheckpointError, match="^no model repo 'kernelhub-test/nope' on the Hub .*"
                       "no local path of that name"):
        kernelhub.from_pretrained(f"{ORG}/nope")
    with pytest.raises(kernelhub.CheckpointError, match=r"has no revision 'v9'; branches and tags: main, v1"):
        kernelhub.from_pretrained(LLAMA, revision="v9")
    with pytest.raises(kernelhub.CheckpointError, match=r"has no revision 'mian'; .* Did you mean 'main'\?"):
        kernelhub.explain(f"{LLAMA}@mian")


@pytest.mark.parametrize("text, phrase", [
    ("not a checkpoint", "checkpoint path 'not a checkpoint' does not exist; .*Hub ids look like \"org/name\""),
    ("path/to/nowhere", "checkpoint path 'path/to/nowhere' does not exist"),
    ("missing.gguf", "GGUF file 'missing.gguf' does not exist; a GGUF file on the Hub is a repo id plus gguf_file="),
    ("org/name@", "ends with '@' but names no revision"),
])
def test_neither_a_path_nor_a_hub_id(hub, text, phrase):
    with pytest.raises(kernelhub.CheckpointError, match=phrase):
        kernelhub.from_pretrained(text)


def test_a_local_path_wins_over_a_hub_id(hub, monkeypatch, tmp_path):
    local = tmp_path / ORG / "tiny-llama"
    write_random_checkpoint(local, seed=3)
    monkeypatch.chdir(tmp_path)
    torch.testing.assert_close(logits(kernelhub.from_pretrained(LLAMA)),
                               logits(kernelhub.from_pretrained(local)), rtol=0, atol=0)
    assert not hub.cache.exists()  # no request was made


def cli(*args, hub, cache: Path) -> subprocess.Popen:
    """`python -m kernelhub ARGS` with the loopback Hub as HF_ENDPOINT, started (not waited for)."""
    env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HUB_CACHE=str(cache / "hf"), KERNELHUB_CACHE=str(cache / "kh"),
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.Popen([sys.executable, "-m", "kernelhub", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_the_cli_takes_hub_ids(hub, tmp_path):
    procs = [cli("run", LLAMA, "--prompt", "w3 w5 w7", "--max-new-tokens", "3", "--revision", "v1", hub=hub,
                 cache=tmp_path / "run"),
             cli("explain", f"{LLAMA}@v1", "--attn", "eager", "--json", hub=hub, cache=tmp_path / "explain")]
    (_, run_err), (plan, plan_err) = (p.communicate(timeout=300) for p in procs)  # started at once: ~5 s each
    assert procs[0].returncode == 0, run_err
    assert "3 tokens in" in run_err
    assert procs[1].returncode == 0, plan_err
    assert {row["chosen"] for row in json.loads(plan) if row["kind"] == "attention"} == {"eager"}


def test_the_cli_reports_a_missing_repo_in_one_line(hub, capsys):
    from kernelhub.cli.commands import main

    assert main(["explain", f"{ORG}/nope@v1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kernelhub: error: no model repo 'kernelhub-test/nope' on the Hub"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["run", LLAMA, "--prompt", "w1", "--revision", "v7"]) == 2
    assert "has no revision 'v7'; branches and tags: main, v1" in capsys.readouterr().err


def test_diff_takes_a_revision_like_run_and_explain(hub, capsys):
    from kernelhub.cli.commands import main

    assert main(["diff", LLAMA, "--revision", "v1", "--a", "eager", "--b", "sdpa", "--prompt", "w3 w5 w7",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"] == [3, 5, 7] and out["ok"]
    refs = hub.cache / "models--kernelhub-test--tiny-llama" / "refs"
    assert {p.name for p in refs.iterdir()} == {"v1"}  # that revision was downloaded, not main
    assert main(["diff", LLAMA, "--revision", "v7", "--a", "eager", "--b", "sdpa"]) == 2
    err = capsys.readouterr().err
    assert "has no revision 'v7'; branches and tags: main, v1" in err and "Traceback" not in err
