"""Poisoning the shared Hugging Face cache: a Hub answer that would store an empty file under the
real commit is refused before anything lands, and a damaged file already in the cache is
fetched again rather than trusted because it is there."""

import os

import pytest
import torch

import kernelhub
from kernelhub.registry.hub.cache_check import EMPTY_GIT_BLOB
from kernelhub.registry.hub.loader import forget_loaded
from kernelhub.testing import point_hub_at
from tests.attack_kernels import payload
from tests.loopback_servers import LoopbackServer, Reply, forward
from tests.unchanged import refused

ORG = "kernelhub-test"
REF = f"{ORG}/rmsnorm@v1"


@pytest.fixture
def model(tiny_checkpoint):
    return kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")


def cached(cache, commit, rel="build/torch-cpu/metadata.json"):
    return cache / "kernels--kernelhub-test--rmsnorm" / "snapshots" / commit / rel


@pytest.mark.parametrize("etag", ["the file's own", "that of empty content"])
def test_a_head_answer_of_size_zero_leaves_no_empty_metadata_under_the_real_commit(
        model, hub, tmp_path, monkeypatch, etag):
    def answer(request):
        status, headers, body = forward(hub.endpoint, request)
        if request.method == "HEAD" and request.path.endswith("/metadata.json"):
            headers["Content-Length"] = "0"
            if etag != "the file's own":
                headers = {k: v for k, v in headers.items() if k.lower() != "etag"} | {"ETag": EMPTY_GIT_BLOB}
        return Reply(status, headers, body)

    proxy = LoopbackServer(answer)
    cache = tmp_path / "hf-cache"
    point_hub_at(monkeypatch, proxy.endpoint, cache)
    try:
        message = refused(model, kernelhub.BindError, [REF], attn="sdpa", kernels={"RMSNorm": REF})
    finally:
        proxy.close()
    assert "metadata.json" in message, message
    commit = hub.commits["rmsnorm"]
    meta = cached(cache, commit)
    assert not (os.path.lexists(meta) and (not meta.exists() or meta.stat().st_size == 0)), \
        "an empty metadata.json was left in the cache under the real commit"
    forget_loaded()
    point_hub_at(monkeypatch, hub.endpoint, cache)  # the healthy Hub, same cache
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": REF})
    assert f"hub {ORG}/rmsnorm@{commit} (RMSNorm)" in {e.source for e in plan.entries}
    assert meta.read_bytes() == (hub.repos["rmsnorm"] / "build/torch-cpu/metadata.json").read_bytes()


@pytest.mark.parametrize("rel", ["build/torch-cpu/metadata.json", "build/torch-cpu/rmsnorm/layers.py"])
def test_a_damaged_cached_file_is_fetched_again_not_trusted(model, hub, tmp_path, marker, rel):
    ids = torch.randint(0, 100, (1, 5))
    reference = model(ids).logits
    kernelhub.bind(model, "sdpa", kernels={"RMSNorm": REF})  # downloads it
    kernelhub.unbind(model)
    forget_loaded()
    target = cached(tmp_path / "hf-cache", hub.commits["rmsnorm"], rel)
    blob = target.resolve()
    blob.chmod(0o644)
    blob.write_text("" if rel.endswith(".json") else target.read_text() + "\n" + payload(marker))
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": REF})
    assert not marker.exists(), "the damaged cached file was imported"
    assert target.read_bytes() == (hub.repos["rmsnorm"] / rel).read_bytes()
    assert any(e.source.startswith(f"hub {ORG}/rmsnorm@") for e in plan.entries)
    torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)
