"""The example plugin, loaded through its installed entry point, against kernelhub's eager reference."""

import importlib.metadata

import pytest
import torch

import kernelhub
from kernelhub.testing.samples import write_random_checkpoint


@pytest.fixture
def registry():
    with kernelhub.scoped_registry(fresh=True, autoload=True) as reg:  # loads installed entry points
        yield reg


def test_entry_point_is_installed():
    eps = importlib.metadata.entry_points(group="kernelhub")
    assert any(ep.value == "kernelhub_example_backend.plugin" for ep in eps)


def test_backend_binds_and_matches_eager(registry, tmp_path):
    assert registry.get("example_chunked").source == "example (kernelhub-example-backend)"
    write_random_checkpoint(tmp_path)
    ours = kernelhub.from_pretrained(tmp_path, attn_implementation="example_chunked")
    eager = kernelhub.from_pretrained(tmp_path, attn_implementation="eager")
    ids = torch.randint(0, 256, (2, 150))  # longer than one 64-key block
    mask = torch.ones_like(ids)
    mask[1, :70] = 0  # a first block with nothing visible for some rows
    with torch.no_grad():
        a, b = ours(ids, attention_mask=mask).logits, eager(ids, attention_mask=mask).logits
    assert (a[mask.bool()] - b[mask.bool()]).abs().max() <= 1e-4
    prompt = ids[:1, :20]
    assert ours.generate(prompt, max_new_tokens=5).tolist() == eager.generate(prompt, max_new_tokens=5).tolist()


def test_refused_where_it_cannot_serve(registry, tmp_path):
    write_random_checkpoint(tmp_path)
    with pytest.raises(kernelhub.BindError, match="example_chunked.*cannot return attention weights"):
        kernelhub.from_pretrained(tmp_path, attn_implementation="example_chunked", output_attentions=True)
