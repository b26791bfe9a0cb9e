"""Inputs that used to escape as raw Python errors (OSError, ValueError, TypeError, RuntimeError,
RecursionError, UnicodeDecodeError, KeyError): each is now a specific `KernelhubError` naming
the problem and the valid form, and the model and the registry are left as they were."""

import json
import shutil

import pytest
import torch

import kernelhub
from kernelhub.declare.errors import KernelRefError, LockError, TrustConfigError
from kernelhub.registry.hub.loader import forget_loaded
from kernelhub.testing import point_hub_at, write_kernel_repo
from tests.attack_kernels import TRUSTED, dependency_chain, kernel, payload, variant
from tests.hub_test_kernels import ATTENTION_JSON, chunked_attention
from tests.loopback_servers import LoopbackServer, Reply
from tests.unchanged import registry_snapshot, refused

DEEP = "[" * 100_000 + "]" * 100_000
LOCKED = {"repo_id": "org/norm", "requested": "v1", "commit": "a" * 40,
          "variants": {"torch-cpu": {"files": {"norm/__init__.py": "b" * 64}}}}


class DevicesIsFive(torch.nn.Module):
    kernel_layer_name = "RMSNorm"
    devices = 5

    def forward(self, x):
        return x


class DtypesIsFive(DevicesIsFive):
    devices = None
    dtypes = 5


class ForwardIsFive(torch.nn.Module):
    kernel_layer_name = "RMSNorm"
    forward = 5


def _refs(tmp_path, monkeypatch, marker):
    return {
        "10k-character Hub ref": (KernelRefError, ["10007 characters long", "the limit is 4096", "Expected 'org/name"],
                                  {"kernels": {"RMSNorm": "org/" + "x" * 10_000 + "@v1"}}),
        "10k-character local ref": (KernelRefError, ["10002 characters long", "the limit is 4096"],
                                    {"kernels": {"RMSNorm": "./" + "x" * 10_000}}),
        "300-character name": (KernelRefError, ["300 characters long; Hub names have at most 96"],
                               {"kernels": {"RMSNorm": "org/" + "x" * 300 + "@v1"}}),
        "NUL in a Hub ref": (KernelRefError, ["contains a NUL character", "Expected 'org/name"],
                             {"kernels": {"RMSNorm": "org/na\0me@v1"}}),
        "NUL in a local ref": (KernelRefError, ["contains a NUL character"], {"kernels": {"RMSNorm": "./a\0b"}}),
        "NUL in an attention ref": (KernelRefError, ["contains a NUL character"],
                                    {"attn": "org/na\0me@v1:attention"}),
    }


def _classes(tmp_path, monkeypatch, marker):
    local = write_kernel_repo(tmp_path / "five", "five",  # trusted code: imported, then its class checked
                              layers=["class RMSNorm(torch.nn.Module):\n    devices = 5\n\n"
                                      "    def forward(self, x):\n        return x\n"])
    return {
        "devices = 5": (kernelhub.BindError, ["DevicesIsFive.devices is 5", "a tuple such as ('cpu', 'cuda')"],
                        {"kernels": {"RMSNorm": DevicesIsFive}}),
        "dtypes = 5": (kernelhub.BindError, ["DtypesIsFive.dtypes is 5", "(torch.float32,)"],
                       {"kernels": {"RMSNorm": DtypesIsFive}}),
        "forward = 5": (kernelhub.BindError, ["ForwardIsFive.forward is 5", "def forward(self, ...)"],
                        {"kernels": {"RMSNorm": ForwardIsFive}}),
        "devices = 5 in a kernel repo": (kernelhub.BindError, ["RMSNorm.devices is 5"],
                                         {"kernels": {"RMSNorm": str(local)}}),
    }


def _arguments(tmp_path, monkeypatch, marker):
    return {
        "device='tpu:99'": (kernelhub.BindError, ["device='tpu:99' is not a torch device", "'cpu', 'cuda'"],
                            {"device": "tpu:99"}),
        "dtype='float33'": (kernelhub.BindError, ["dtype='float33' is not a dtype", "'float32'"],
                            {"dtype": "float33"}),
        "dtype=5": (kernelhub.BindError, ["dtype=5 is not a dtype"], {"dtype": 5}),
        "lock=5": (LockError, ["lock=5 (int) is not a lock file", "kernelhub.lock"], {"lock": 5}),
    }


def _deep_files(tmp_path, monkeypatch, marker):
    cache = tmp_path / "hf-cache"
    point_hub_at(monkeypatch, None, cache, offline=True)
    monkeypatch.setenv("KERNELHUB_TRUSTED", TRUSTED)
    top = dependency_chain(cache, tmp_path / "chain", 400)
    deep_meta = kernel(tmp_path, "deep-meta", init=payload(marker))
    (variant(deep_meta) / "metadata.json").write_text('{"name": "deep-meta", "x": ' + DEEP + "}")
    deep_attn = write_kernel_repo(tmp_path / "deep-attn", "deep-attn", functions=[chunked_attention],
                                  init_source=payload(marker), kernelhub_json=ATTENTION_JSON)
    (variant(deep_attn) / "kernelhub.json").write_text('{"attention": ' + DEEP + "}")
    return {
        "a 400-deep kernel-depends chain": (kernelhub.BindError, [f"{TRUSTED}/chain-0@v1 -> ", "deeper than 32"],
                                            {"kernels": {"RMSNorm": top}}),
        "metadata.json nested 100k deep": (kernelhub.BindError, ["metadata.json is nested deeper than 64 levels"],
                                           {"kernels": {"RMSNorm": str(deep_meta)}}),
        "kernelhub.json nested 100k deep": (kernelhub.BindError, ["kernelhub.json is nested deeper than 64 levels"],
                                            {"attn": f"{deep_attn}:chunked_attention"}),
    }


def _locks_and_config(tmp_path, monkeypatch, marker):
    duplicate = tmp_path / "duplicate.lock"
    duplicate.write_text('{"lock_version": 1, "kernels": {}, "kernels": ' + json.dumps({"org/norm@v1": LOCKED}) + "}")
    newline = tmp_path / "newline.lock"
    entry = {**LOCKED, "commit": "a" * 40 + "\n"}
    newline.write_text(json.dumps({"lock_version": 1, "kernels": {"org/norm@v1": entry}}))
    config = tmp_path / "config.toml"
    config.write_bytes(b'trusted = ["caf\xe9"]\n')
    repo = str(kernel(tmp_path, "norm", init=payload(marker)))
    return {
        "duplicate keys in a lock": (LockError, ["the key 'kernels' appears twice", "write each key once"],
                                     {"kernels": {"RMSNorm": repo}, "lock": duplicate}),
        "a locked commit with a trailing newline": (LockError, ["commit is 'aaaa", "\\n'", "40 lowercase hex"],
                                                    {"kernels": {"RMSNorm": repo}, "lock": newline}),
        "an invalid-UTF-8 trust config": (TrustConfigError, [str(config), "not UTF-8", 'trusted = ["my-org"]'],
                                          {"kernels": {"RMSNorm": "someone/norm@v1"}, "env": config}),
    }


CASES = {  # builder -> the cases it sets up (a builder writes only the files its cases need)
    _refs: ["10k-character Hub ref", "10k-character local ref", "300-character name", "NUL in a Hub ref",
            "NUL in a local ref", "NUL in an attention ref"],
    _classes: ["devices = 5", "dtypes = 5", "forward = 5", "devices = 5 in a kernel repo"],
    _arguments: ["device='tpu:99'", "dtype='float33'", "dtype=5", "lock=5"],
    _deep_files: ["a 400-deep kernel-depends chain", "metadata.json nested 100k deep",
                  "kernelhub.json nested 100k deep"],
    _locks_and_config: ["duplicate keys in a lock", "a locked commit with a trailing newline",
                        "an invalid-UTF-8 trust config"],
}


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


@pytest.mark.parametrize("build, case", [(b, c) for b, cases in CASES.items() for c in cases],
                         ids=[c for cases in CASES.values() for c in cases])
def test_bad_input_is_a_specific_error_naming_the_valid_form(model, tmp_path, monkeypatch, marker, build, case):
    error, phrases, kwargs = build(tmp_path, monkeypatch, marker)[case]
    if "env" in kwargs:
        monkeypatch.setenv("KERNELHUB_CONFIG", str(kwargs.pop("env")))
    message = refused(model, error, phrases, attn=kwargs.pop("attn", "sdpa"), marker=marker, **kwargs)
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    forget_loaded()


def test_an_empty_json_hub_reply_is_named_not_a_bare_key(model, tmp_path, monkeypatch):
    server = LoopbackServer(lambda request: Reply(200, {"Content-Type": "application/json"}, b"{}"))
    point_hub_at(monkeypatch, server.endpoint, tmp_path / "hf-cache")
    monkeypatch.setenv("KERNELHUB_TRUSTED", TRUSTED)
    try:
        message = refused(model, kernelhub.BindError, [server.endpoint, "not a Hugging Face Hub API reply",
                                                       "HF_ENDPOINT"], attn="sdpa",
                          kernels={"RMSNorm": f"{TRUSTED}/norm@v1"})
    finally:
        server.close()
    assert not message.rstrip(". ").endswith("'branches'"), message


class Bf16Only(torch.nn.Module):
    kernel_layer_name = "RMSNorm"
    dtypes = (torch.bfloat16,)

    def forward(self, x):
        return x


def test_a_dtype_given_by_name_is_a_dtype(model):
    plan = kernelhub.bind(model, "sdpa", dtype="float32")
    assert plan.dtype == "float32"
    message = refused(model, kernelhub.BindError, ["supports bfloat16, not float32"], attn="sdpa", dtype="float32",
                      kernels={"RMSNorm": Bf16Only})
    assert "not float32" in message and "supports float32" not in message


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_checkpoint_json_nested_100k_deep_is_refused_by_the_bounded_reader(tmp_path, name):
    from kernelhub.declare.errors import CheckpointError
    from kernelhub.declare.json_limits import load_json

    with pytest.raises(CheckpointError, match=f"{name} is nested deeper than 64 levels"):
        load_json(('{"weight_map": ' + DEEP + "}").encode(), name, CheckpointError)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_checkpoint_with_json_nested_100k_deep_is_a_checkpoint_error(tiny_checkpoint, tmp_path, name):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    if name != "config.json":
        (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    (path / name).write_text('{"weight_map": ' + DEEP + "}" if name != "config.json" else DEEP)
    before = registry_snapshot()
    try:
        with pytest.raises(kernelhub.CheckpointError, match="nested deeper than"):
            kernelhub.from_pretrained(path)
    except RecursionError:  # no 100,000-frame traceback in the report
        pytest.fail(f"RecursionError reading {name}", pytrace=False)
    assert registry_snapshot() == before
