"""Compiled decoding: `generate(cache="static", compile=True)` and `generate_batch(compile=True)`
compile once per shape bucket, never per token, prompt length or step, and give eager's tokens.

Graphs are counted with dynamo's own counters (`unique_graphs`: one per compiled graph,
recompilations included). The model has two layers, one full and one sliding, so both kinds
of KV pool are exercised; it is kept this small because each graph costs a real inductor
compilation.
"""

import operator
import random
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import kernelhub
from kernelhub.backends.onednn_linear import pack, packed_linear
from kernelhub.runtime import compiled_batching
from kernelhub.runtime.compiled_batching import packed_step, token_bucket
from kernelhub.runtime import kept_cache
from kernelhub.runtime.compiled_decode import decode_step, static_cache_length
from tests.checkpoints import CONFIGS
from tests.unchanged import assert_unchanged, snapshot


@pytest.fixture(scope="module")
def two_layer_checkpoint(tmp_path_factory):
    """A transformers qwen2 checkpoint: layer 0 full attention, layer 1 sliding (window 4)."""
    import transformers

    path = tmp_path_factory.mktemp("qwen2-2l")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(**dict(CONFIGS["qwen2"], num_hidden_layers=2))
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def graphs() -> int:
    """Graphs dynamo built. A compiled generate builds one for one shape and binding (and, once that
    graph has run thousands of steps, its pinned twin: `kernelhub.runtime.pinned_step`)."""
    return counters["stats"]["unique_graphs"]


def test_compiled_generate_compiles_once_across_prompt_lengths_and_tokens(two_layer_checkpoint):
    model = kernelhub.from_pretrained(two_layer_checkpoint, attn_implementation="sdpa")
    short, long = [5, 17, 3, 9, 2], [8, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 11, 7]
    # both need 64 positions or fewer (prompt + 33 new): one bucket, one cache shape
    assert static_cache_length(len(short) + 33) == static_cache_length(len(long) + 33) == 64
    before = graphs()
    for prompt in (short, long):
        ids = torch.tensor([prompt])
        compiled = model.generate(ids, max_new_tokens=33, cache="static", compile=True, eos_token_id=None)
        assert compiled.tolist() == model.generate(ids, max_new_tokens=33, eos_token_id=None).tolist()
    # 2 prompts x 32 decode steps (the first token comes from the eager prefill): one graph
    assert graphs() - before == 1


def test_compiled_generate_shares_one_graph_across_batches_in_a_bucket(two_layer_checkpoint):
    """Batches of 3 and 4 run as 4 rows (filler rows repeat the first, their outputs dropped): one graph,
    and each batch gets eager's tokens; the filler never shows in the output or the sampling."""
    model = kernelhub.from_pretrained(two_layer_checkpoint, attn_implementation="sdpa")
    prompts = torch.tensor([[0, 5, 17, 3], [8, 1, 4, 1], [0, 0, 9, 2], [7, 7, 1, 3]])
    mask = (prompts != 0).long()
    before = graphs()
    for batch in (3, 4):
        ids, m = prompts[:batch], mask[:batch]
        compiled = model.generate(ids, attention_mask=m, max_new_tokens=6, cache="static", compile=True,
                                  eos_token_id=None)
        assert compiled.shape == (batch, 10)
        assert compiled.tolist() == model.generate(ids, attention_mask=m, max_new_tokens=6, eos_token_id=None).tolist()
        sampled = [model.generate(ids, attention_mask=m, max_new_tokens=6, do_sample=True, seed=3, eos_token_id=None,
                                  **kw).tolist() for kw in ({}, {"cache": "static", "compile": True})]
        assert sampled[0] == sampled[1]  # the same draws: filler rows take no random numbers
    assert graphs() - before == 1


def test_compiled_generate_reuses_its_cache_across_calls_cleared(two_layer_checkpoint):
    """A finished call leaves its static cache with the model and the next call of that shape takes it
    (the same tensors, so CUDA graphs replay instead of recording again), cleared: stale keys or a NaN
    left in the buffers must not reach the next call's tokens. A cache returned to the caller is its
    own; a call of another shape drops the kept one."""
    model = kernelhub.from_pretrained(two_layer_checkpoint, attn_implementation="sdpa")
    run = dict(max_new_tokens=8, cache="static", compile=True, eos_token_id=None)
    first, second = torch.tensor([[5, 17, 3, 9, 2]]), torch.tensor([[8, 1, 4]])
    model.generate(first, **run)
    kept = kept_cache.kept(model, "static")
    address = kept.keys[0].data_ptr()
    with torch.inference_mode():  # generate made it there
        for t in kept.values:
            t.fill_(float("nan"))  # whatever a previous call left behind
    assert model.generate(second, **run).tolist() == model.generate(second, max_new_tokens=8,
                                                                     eos_token_id=None).tolist()
    again = kept_cache.kept(model, "static")
    assert again is kept and again.keys[0].data_ptr() == address
    returned = model.generate(second, return_dict_in_generate=True, **run).past_key_values
    assert returned is not kept and kept_cache.kept(model, "static") is kept  # the caller's own cache
    model.generate(torch.tensor([[1, 2], [3, 4]]), **run)  # two rows: another shape
    assert kept_cache.kept(model, "static") is not kept


def test_threads_taking_the_kept_cache_at_once_never_share_it(tiny_checkpoint):
    """Calls that overlap each get their own cache: the kept one goes to one of them."""
    model = kernelhub.from_pretrained(tiny_checkpoint)
    lock, in_use, clashes, most = threading.Lock(), set(), [], [0]

    spec = ("rows", 2)

    def worker():
        for _ in range(200):
            cache = kept_cache.take(model, "static", spec, lambda: model.make_cache("static", batch=2, max_len=64))
            with lock:
                clashes.extend([cache] if id(cache) in in_use else [])
                in_use.add(id(cache))
                most[0] = max(most[0], len(in_use))
            time.sleep(0)  # let the others run while this one holds its cache
            with lock:
                in_use.discard(id(cache))
            kept_cache.keep(model, "static", spec, cache)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] >= 2, "the threads never held caches at the same time"
    assert not clashes


def test_compiled_batching_compiles_once_per_token_bucket_and_equals_uncompiled(two_layer_checkpoint):
    model = kernelhub.from_pretrained(two_layer_checkpoint, attn_implementation="paged|sdpa")
    rng = random.Random(0)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randrange(1, 30))] for _ in range(64)]
    options = dict(max_new_tokens=4, max_batch_tokens=16, block_size=4)
    expected = model.generate_batch(prompts, **options)
    before = graphs()
    results = model.generate_batch(prompts, compile=True, **options)
    assert [r.tokens for r in results] == [r.tokens for r in expected]
    # decode-only steps of a few requests and full 16-token steps: two buckets, compiled once each
    assert results.stats["token_buckets"] == [8, 16]
    assert graphs() - before == 2
    # another run with other prompts (same pool bucket) reuses them: no compilation at all, and it runs in
    # the cache the first run left (the same pool addresses, for CUDA graphs), cleared of its leftovers
    pool = kept_cache.kept(model, "paged")
    with torch.inference_mode():
        for t in pool.values:
            t.fill_(float("nan"))
    again = model.generate_batch([p[::-1] for p in prompts], compile=True, **options)
    assert kept_cache.kept(model, "paged") is pool
    assert graphs() - before == 2
    assert [r.tokens for r in again] == [r.tokens for r in model.generate_batch([p[::-1] for p in prompts],
                                                                                 **options)]


def test_compiled_generate_with_flex_gives_eager_tokens(tiny_checkpoint):
    """flex's mask reads the step's cache position from a device tensor inside the graph; inductor's
    CPU flex kernel lowers a mask over tensors passed in, which that position is."""
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="flex")
    ids, mask = torch.tensor([[0, 0, 5, 17, 3], [8, 1, 4, 1, 5]]), torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
    compiled = model.generate(ids, attention_mask=mask, max_new_tokens=6, cache="static", compile=True,
                              eos_token_id=None)
    assert compiled.tolist() == model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None).tolist()


def test_token_buckets_stay_within_the_budget():
    assert [token_bucket(n, 24) for n in (1, 8, 9, 16, 17, 24)] == [8, 8, 16, 16, 24, 24]
    assert [static_cache_length(n) for n in (1, 64, 65, 1024, 1025)] == [64, 64, 128, 1024, 2048]


def test_compile_needs_a_static_cache_and_a_bool(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    before = snapshot(model)
    with pytest.raises(ValueError, match="compile=True needs cache='static'"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, compile=True)
    with pytest.raises(ValueError, match="compile must be True or False, got 'yes'"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, cache="static", compile="yes")
    with pytest.raises(ValueError, match="compile must be True or False, got 1.5"):
        model.generate_batch([[1, 2]], max_new_tokens=2, compile=1.5)
    assert_unchanged(model, before)


def test_compiled_generate_calls_the_onednn_packed_linear_kernel(two_layer_checkpoint):
    """The oneDNN Linear kernel compiles (an opaque op over the weights its eager prefill packed)."""
    model = kernelhub.from_pretrained(two_layer_checkpoint, attn_implementation="sdpa", kernels={"Linear": "onednn"})
    ids = torch.tensor([[5, 17, 3, 9, 2, 11]])
    compiled = model.generate(ids, max_new_tokens=8, cache="static", compile=True, eos_token_id=None)
    assert compiled.tolist() == model.generate(ids, max_new_tokens=8, eos_token_id=None).tolist()


def test_the_packed_linear_op_passes_opcheck_and_never_reads_a_stale_packing():
    weight, x, bias = torch.randn(16, 8), torch.randn(3, 8), torch.randn(16)
    # opcheck clones its inputs, which an opaque packed tensor refuses: checked with a plain one
    torch.library.opcheck(torch.ops.kernelhub.onednn_packed_linear, (x, weight, weight.clone(), bias))
    packed = pack(weight)
    torch.testing.assert_close(packed_linear(x, weight, packed, bias), F.linear(x, weight, bias))
    with torch.no_grad():
        weight.mul_(-2)  # in place, after packing: a compiled graph would still hold the old packing
    torch.testing.assert_close(packed_linear(x, weight, packed, bias), F.linear(x, weight, bias))


class EagerOnlyRMSNorm(torch.nn.Module):
    """An RMSNorm kernel that cannot be traced (as Python-side kernels often cannot)."""

    can_torch_compile = False

    def forward(self, x):
        torch._dynamo.graph_break()
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


def test_a_kernel_that_cannot_compile_fails_with_the_way_out(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, kernels={"RMSNorm": EagerOnlyRMSNorm})
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(RuntimeError, match=r"generate\(compile=True\) could not compile the model's step as one "
                                           r"graph \(Unsupported: .*\); bind kernels that can run under "
                                           r"torch.compile \(load with mode='inference\|compile'"):
        model.generate(ids, max_new_tokens=3, cache="static", compile=True)
    assert model.generate(ids, max_new_tokens=3, cache="static").shape == (1, 6)  # still serves eagerly


def written_inputs(gm, inputs) -> list:
    """The inputs a dynamo graph writes in place: in-place methods and item assignments, on the input
    or on a view of it."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    written = []
    for n in gm.graph.nodes:
        if (n.op == "call_method" and n.target.endswith("_")) or n.target is operator.setitem:
            base = n.args[0]
            while base.op == "call_method" and base.target == "view":
                base = base.args[0]
            assert base in placeholders, f"{n.format_node()} writes a tensor made inside the graph"
            written.append(inputs[placeholders.index(base)])
    return written


def record_graphs(seen: list):
    """A dynamo backend that keeps each graph and its example inputs, and runs the graph as traced."""
    def record(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward
    return record


def test_the_decode_step_graph_is_capturable_one_graph_for_every_position(two_layer_checkpoint):
    """What a CUDA graph needs, checked on the traced step (a CPU cannot capture one): nothing that
    varies per token on the host (no symbolic ints, no Python numbers among the inputs, one graph
    for every position), and in-place writes only into tensors with fixed addresses (the cache's)."""
    model = kernelhub.from_pretrained(two_layer_checkpoint, attn_implementation="sdpa")
    graphs_seen = []
    # dynamo keeps graphs per code object: steps earlier tests compiled in this process would count
    # against this wrapper's recompile limit
    torch._dynamo.reset()
    step_fn = torch.compile(decode_step, backend=record_graphs(graphs_seen), fullgraph=True, dynamic=False)
    prompt = torch.tensor([[0, 0, 5, 17, 3], [8, 1, 4, 1, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    cache = model.make_cache("static", batch=2, max_len=16)
    eager_cache = model.make_cache("static", batch=2, max_len=16)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        for c in (cache, eager_cache):
            model(prompt, attention_mask=mask, position_ids=positions, cache=c)
        padding, token, positions = F.pad(mask, (0, 11), value=1), torch.tensor([[7], [9]]), positions[:, -1:]
        for _ in range(6):
            positions = positions + 1
            got = step_fn(model, token, positions, padding, cache.step_view(1))
            cache.seen += 1
            want = decode_step(model, token, positions, padding, eager_cache)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            token = want.argmax(-1, keepdim=True)
    assert len(graphs_seen) == 1, "the step was traced again for a later position"
    gm, inputs = graphs_seen[0]
    assert all(isinstance(x, torch.Tensor) for x in inputs), [type(x).__name__ for x in inputs if
                                                              not isinstance(x, torch.Tensor)]
    written = written_inputs(gm, inputs)
    assert {id(t) for t in written} == {id(t) for t in cache.keys + cache.values}  # the cache, and nothing else
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in written)
    torch.testing.assert_close(cache.keys[1], eager_cache.keys[1])  # the graph wrote where eager writes


def test_the_batching_step_graph_writes_only_pools_and_leaves_attention_uncaptured(two_layer_checkpoint,
                                                                                    monkeypatch):
    """Piecewise capture, checked on the traced steps: the attention op (which reads each step's layout
    from Python) is tagged for inductor to split the graph around it, and the pieces write only the
    cache's pools, whose addresses are fixed."""
    model = kernelhub.from_pretrained(two_layer_checkpoint, attn_implementation="paged|sdpa")
    graphs_seen = []
    stepper = torch.compile(packed_step, backend=record_graphs(graphs_seen), fullgraph=True, dynamic=False)
    monkeypatch.setattr(compiled_batching, "compiled_packed_step", lambda cuda_graphs=False: stepper)
    rng = random.Random(1)
    prompts = [[rng.randrange(model.config.vocab_size) for _ in range(rng.randrange(1, 12))] for _ in range(6)]
    options = dict(max_new_tokens=3, max_batch_tokens=16, block_size=4)
    results = model.generate_batch(prompts, compile=True, **options)
    assert [r.tokens for r in results] == [r.tokens for r in model.generate_batch(prompts, **options)]
    op = torch.ops.kernelhub.paged_step_attention.default
    assert torch._C.Tag.cudagraph_unsafe in op.tags
    assert len(graphs_seen) == 2  # the 8- and 16-token buckets
    for gm, inputs in graphs_seen:
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and "paged_step_attention" in str(n.target)]
        assert len(calls) == 2, gm.code  # one per layer, left in the graph as the op
        written = written_inputs(gm, inputs)
        assert len(written) == 4 and all(getattr(t, "_dynamo_static_input_type", None) == "unguarded"
                                         for t in written)  # keys and values of two layers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs are captured on a CUDA device only; "
                    "the capturable graph is checked on CPU by the tests above")
def test_compiled_generate_on_cuda_replays_captured_graphs_and_gives_eager_tokens(two_layer_checkpoint):
    model = kernelhub.from_pretrained(two_layer_checkpoint, attn_implementation="sdpa", device="cuda")
    ids = torch.tensor([[5, 17, 3, 9, 2], [8, 1, 4, 1, 5]], device="cuda")
    inductor = counters["inductor"]
    skips, recorded = inductor["cudagraph_skips"], inductor["cudagraph_recorded_non_static_inputs"]
    compiled = model.generate(ids, max_new_tokens=24, cache="static", compile=True, eos_token_id=None)
    assert inductor["cudagraph_skips"] == skips, "inductor refused to capture the decode step"
    assert inductor["cudagraph_recorded_non_static_inputs"] > recorded, "no CUDA graph was recorded"
    recorded = inductor["cudagraph_recorded_non_static_inputs"]
    again = model.generate(ids[:, 1:], max_new_tokens=24, cache="static", compile=True, eos_token_id=None)
    assert inductor["cudagraph_recorded_non_static_inputs"] == recorded, "the second call recorded again"
    assert again.tolist() == model.generate(ids[:, 1:], max_new_tokens=24, eos_token_id=None).tolist()
    assert compiled.tolist() == model.generate(ids, max_new_tokens=24, eos_token_id=None).tolist()

    paged = kernelhub.from_pretrained(two_layer_checkpoint, attn_implementation="paged|sdpa", device="cuda")
    prompts, recorded = [[5, 17, 3], [8, 1, 4, 1, 5, 9]], inductor["cudagraph_recorded_non_static_inputs"]
    batch = paged.generate_batch(prompts, max_new_tokens=16, compile=True)
    assert inductor["cudagraph_skips"] == skips, "inductor refused to capture the batching step"
    assert inductor["cudagraph_recorded_non_static_inputs"] > recorded, "no piece of the batching step was recorded"
    assert [r.tokens for r in batch] == [r.tokens for r in paged.generate_batch(prompts, max_new_tokens=16)]
