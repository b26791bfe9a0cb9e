"""output_hidden_states / output_attentions through lazily installed hooks and a ContextVar."""

import gc

import pytest
import torch

import kernelhub
from checkpoints import write_hf_checkpoint
from threads import run_in_threads
from kernelhub.testing.samples import minilm_dir


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    reference = write_hf_checkpoint("llama", path)
    return path, reference


IDS = torch.tensor([[5, 3, 9, 1, 7, 2, 8], [4, 4, 2, 6, 1, 3, 3]])


def test_hidden_states_and_attentions_match_transformers(llama):
    path, reference = llama
    model = kernelhub.from_pretrained(path, attn_implementation="eager")
    reference.config._attn_implementation = "eager"
    with torch.no_grad():
        ours = model(IDS, output_hidden_states=True, output_attentions=True)
        theirs = reference(IDS, output_hidden_states=True, output_attentions=True)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 4
    for a, b in zip(ours.hidden_states, theirs.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours.attentions, theirs.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_bert_hidden_states_match_transformers():
    import transformers

    batch = kernelhub.load_tokenizer(minilm_dir())(["A man is eating food.", "Hi"], padding=True,
                                                    return_tensors="pt")
    ours = kernelhub.from_pretrained(minilm_dir(), attn_implementation="sdpa")
    theirs = transformers.BertModel.from_pretrained(minilm_dir(), attn_implementation="sdpa").eval()
    with torch.no_grad():
        a = ours(**batch, output_hidden_states=True).hidden_states
        b = theirs(**batch, output_hidden_states=True).hidden_states
    valid = batch["attention_mask"].bool()
    assert len(a) == len(b) == 7
    for x, y in zip(a, b):
        assert (x[valid] - y[valid]).abs().max() <= 1e-5


def test_a_model_that_never_captures_has_no_hooks(llama):
    model = kernelhub.from_pretrained(llama[0], attn_implementation="sdpa")

    def hooks(m):
        return sum(len(sub._forward_hooks) for sub in m.modules())

    assert hooks(model) == 1  # binding's own: the model's forward runs one binding (declare/binding.py)
    model(IDS)
    assert hooks(model) == 1
    model(IDS, output_hidden_states=True)
    installed = hooks(model)
    assert installed > 0
    model(IDS, output_hidden_states=True)
    assert hooks(model) == installed  # installed once, not per call


def test_attentions_on_a_backend_without_weights_is_a_clear_error(llama):
    model = kernelhub.from_pretrained(llama[0], attn_implementation="sdpa")
    with pytest.raises(kernelhub.KernelhubError) as info:
        model(IDS, output_attentions=True)
    assert "bound to 'sdpa', which cannot return them" in str(info.value)
    assert "attn_implementation='eager'" in str(info.value)


def test_threads_with_and_without_capture_get_single_thread_results(llama):
    model = kernelhub.from_pretrained(llama[0], attn_implementation="eager")
    inputs = [torch.randint(0, 96, (1, 6 + i % 3)) for i in range(8)]
    with torch.no_grad():
        expected = [model(x, output_hidden_states=i % 2 == 0) for i, x in enumerate(inputs)]
    results = [None] * 8

    def worker(i):
        with torch.no_grad():
            for _ in range(5):
                results[i] = model(inputs[i], output_hidden_states=i % 2 == 0)

    run_in_threads(worker)
    for i, (got, want) in enumerate(zip(results, expected)):
        assert torch.equal(got.logits, want.logits)
        if i % 2:
            assert got.hidden_states is None
        else:
            assert len(got.hidden_states) == 4
            assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_stays_flat_over_200_capturing_forwards(llama):
    model = kernelhub.from_pretrained(llama[0], attn_implementation="eager")
    ids = torch.randint(0, 96, (4, 64))
    with torch.no_grad():
        for _ in range(20):  # warm up allocator caches
            model(ids, output_hidden_states=True, output_attentions=True)
        gc.collect()
        before = rss_bytes()
        for _ in range(200):
            out = model(ids, output_hidden_states=True, output_attentions=True)
        del out
        gc.collect()
        growth = rss_bytes() - before
    # One forward captures about 1 MB; retaining them all would grow RSS by about 200 MB.
    assert growth < 20 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
