"""Every file kernelhub reads about a kernel is checked field by field: a malformed lock,
kernelhub.json or metadata.json is one clear error naming the file and the field, nothing
of the kernel runs, and the model and registry stay as they were."""

import copy
import json

import pytest

import kernelhub
from kernelhub.registry.hub.lockfile import LockError
from kernelhub.testing import write_kernel_repo
from tests.attack_kernels import kernel, payload, refused, variant
from tests.hub_test_kernels import chunked_attention

ENTRY = {"repo_id": "org/norm", "requested": "v1", "commit": "a" * 40,
         "variants": {"torch-cpu": {"files": {"norm/__init__.py": "b" * 64}}}}
GOOD = {"lock_version": 1, "kernels": {"org/norm@v1": ENTRY}}


def lock_with(change):
    data = copy.deepcopy(GOOD)
    change(data)
    return data


def entry(data):
    return data["kernels"]["org/norm@v1"]


def files(data):
    return entry(data)["variants"]["torch-cpu"]["files"]


MALFORMED_LOCKS = [
    ("[]", "the top level is []"),
    ("null", "the top level is None"),
    ("not json", "is not valid JSON"),
    (lock_with(lambda d: d.update(kernels=[])), "kernels is []"),
    (lock_with(lambda d: d.update(lock_version=2)), "lock_version is 2"),
    (lock_with(lambda d: d.update(lock_version=True)), "lock_version is True"),
    (lock_with(lambda d: d.pop("lock_version")), "exactly the fields kernels, lock_version"),
    (lock_with(lambda d: d.update(extra=1)), "exactly the fields kernels, lock_version"),
    (lock_with(lambda d: d["kernels"].update({"org/norm@v1": "x"})), "kernels['org/norm@v1'] is 'x'"),
    (lock_with(lambda d: entry(d)["variants"].update({"torch-cpu": {}})), "exactly one field, 'files'"),
    (lock_with(lambda d: entry(d)["variants"].update({"torch-cpu": {"files": []}})), ".files is []"),
    (lock_with(lambda d: entry(d).update(variants={})), "a non-empty object of build variants"),
    (lock_with(lambda d: files(d).update({"norm/__init__.py": "B" * 64})), "64 lowercase hex digits"),
    (lock_with(lambda d: files(d).update({"norm/__init__.py": "b" * 12})), "64 lowercase hex digits"),
    (lock_with(lambda d: files(d).update({"norm/__init__.py": 7})), "64 lowercase hex digits"),
    (lock_with(lambda d: entry(d).update(commit="abc123")), "40 lowercase hex digits"),
    (lock_with(lambda d: entry(d).update(commit="A" * 40)), "40 lowercase hex digits"),
    (lock_with(lambda d: entry(d).pop("commit")), "the fields commit, repo_id, requested, variants"),
    (lock_with(lambda d: entry(d).update(repo_id="org/other")), "to match the key 'org/norm@v1'"),
    (lock_with(lambda d: d.update(kernels={"org/norm@v1:RMSNorm": ENTRY})), "(no ':Symbol')"),
    (lock_with(lambda d: d.update(kernels={"not a ref": ENTRY})), "not a valid kernel reference"),
    (lock_with(lambda d: files(d).update({"../escape.py": "b" * 64})), "a relative path inside the variant"),
    (lock_with(lambda d: files(d).update({"/etc/passwd": "b" * 64})), "a relative path inside the variant"),
    (lock_with(lambda d: entry(d)["variants"].update({"../x": {"files": {"a": "b" * 64}}})), "build variant name"),
    (lock_with(lambda d: d.update(kernels={"./mine": {"path": "other", "variants": ENTRY["variants"]}})),
     "matching the key './mine'"),
]


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


@pytest.mark.parametrize("content, phrase", MALFORMED_LOCKS, ids=[p for _, p in MALFORMED_LOCKS])
def test_malformed_lock_file_is_one_clear_error(model, tmp_path, content, phrase):
    lock = tmp_path / "kernelhub.lock"
    lock.write_text(content if isinstance(content, str) else json.dumps(content))
    marker = tmp_path / "MARKER"
    repo = kernel(tmp_path, "norm", init=payload(marker))
    message = refused(model, LockError, [phrase, str(lock)], marker, kernels={"RMSNorm": str(repo)}, lock=lock)
    assert "Traceback" not in message


def attention(**declaration):
    return {"attention": {"chunked_attention": {"mask_format": "bool", **declaration}},
            "default_attention": "chunked_attention"}


MALFORMED_KERNELHUB_JSON = [
    (attention(accepts_is_causal="no"), "accepts_is_causal is 'no'"),
    (attention(capabilities={"head_dim": 64}), "head_dim is 64"),
    (attention(capabilities={"head_dim": [0, 64]}), "two positive integers"),
    (attention(capabilities={"head_dim": [128, 64]}), "min <= max"),
    (attention(capabilities={"dtypes": "float32"}), "dtypes is 'float32'"),
    (attention(capabilities={"dtypes": ["float64"]}), "drawn from float32, bfloat16, float16"),
    (attention(capabilities={"devices": "cpux"}), "devices is 'cpux'"),
    (attention(capabilities={"devices": ["cpux"]}), "devices is ['cpux']"),
    (attention(capabilities={"gqa": "yes"}), "gqa is 'yes'"),
    (attention(capabilities={"backward": "cuda"}), "backward is 'cuda'"),
    (attention(capabilities={"flash": True}), "capabilities among"),
    (attention(capabilities=[]), "capabilities is []"),
    ({"attention": {"chunked_attention": {"mask_format": "boolean"}}}, "mask_format is 'boolean'"),
    ({"attention": {"chunked_attention": {}}}, "mask_format is None"),
    ({"attention": []}, "attention is []"),
    ({"attention": {"my-fn": {"mask_format": "bool"}}}, "a Python function name"),
    ({**attention(), "default_attention": "other"}, "default_attention is 'other'"),
    ({**attention(), "extra": 1}, "only the fields attention, default_attention"),
    ([], "the top level is []"),
]


@pytest.mark.parametrize("declaration, phrase", MALFORMED_KERNELHUB_JSON, ids=[p for _, p in MALFORMED_KERNELHUB_JSON])
def test_malformed_kernelhub_json_is_refused_before_import(model, tmp_path, declaration, phrase):
    marker = tmp_path / "MARKER"
    repo = write_kernel_repo(tmp_path / "attn", "attn", functions=[chunked_attention], init_source=payload(marker),
                             kernelhub_json=declaration)
    refused(model, kernelhub.BindError, [phrase, "kernelhub.json"], marker, attn=f"{repo}:chunked_attention")


MALFORMED_DEPENDS = [
    ({"repo-id": "org/dep"}, "exactly one of 'version' or 'revision'"),
    ({"repo-id": "org/dep", "version": "1"}, "version is '1'"),
    ({"repo-id": "org/dep", "version": 0}, "version is 0"),
    ({"repo-id": "org/dep", "version": True}, "version is True"),
    ({"repo-id": "org/dep", "version": 1, "revision": "main"}, "exactly one of"),
    ({"repo-id": "not a repo", "version": 1}, "not a valid kernel reference"),
    ({"repo-id": "org/dep", "revision": "main:x"}, "revision is 'main:x'"),
    ("org/dep", "kernel-depends[0] is 'org/dep'"),
]


@pytest.mark.parametrize("dep, phrase", MALFORMED_DEPENDS, ids=[p for _, p in MALFORMED_DEPENDS])
def test_malformed_kernel_depends_is_refused_before_import(model, tmp_path, dep, phrase):
    marker = tmp_path / "MARKER"
    repo = kernel(tmp_path, "norm", init=payload(marker), depends=[dep])
    refused(model, kernelhub.BindError, [phrase, "metadata.json"], marker, kernels={"RMSNorm": str(repo)})


def test_metadata_with_a_bad_name_or_missing_is_refused(model, tmp_path):
    marker = tmp_path / "MARKER"
    repo = kernel(tmp_path, "norm", init=payload(marker))
    meta = variant(repo) / "metadata.json"
    data = json.loads(meta.read_text())
    meta.write_text(json.dumps({**data, "kernel-depends": {"repo-id": "org/dep"}}))
    refused(model, kernelhub.BindError, ["kernel-depends is {'repo-id': 'org/dep'}"], marker,
            kernels={"RMSNorm": str(repo)})
