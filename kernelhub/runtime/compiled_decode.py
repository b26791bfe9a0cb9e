"""The compiled decode step of `generate(..., cache="static", compile=True)`: one graph per shape bucket.

A decode step has fixed shapes once the static cache's length and the batch are fixed, so
`torch.compile` can build one graph for it. Three things would still make it recompile, and
all are handled here:

- **the prompt length.** The cache is sized in buckets (`static_cache_length`), so prompts of
  different lengths whose prompt + new tokens fall in the same bucket share one cache shape,
  hence one graph.
- **the batch size.** It is rounded up (`batch_bucket`: 1, 2, 4, 8, then multiples of 8): the
  extra rows repeat the first and their outputs are dropped, so batches of 3 and 4 share a graph.
- **the write position**, which moves every token. The step sees the cache through a
  `StaticCacheStep`, whose position is a 0-d device tensor (a graph input, as the cache's
  tensors are), not a Python int the compiler would specialise on or guard. The host keeps the count
  (`StaticCache.seen`) and refreshes the tensor before each step with a kernel launch.

Shapes stay static otherwise (`dynamic=False`): each bucket gets code specialised to its sizes.
The prefill runs eagerly (one call per prompt, of a length that varies).

**Per-step overhead.** On a small model a step's kernels take a few milliseconds, so what runs
between them counts: a CPU model whose weights stay in packed GGUF blocks runs inductor's C++
wrapper rather than its Python one (`wants_cpp_wrapper`). Dynamo's guards on the model (about
6,000 for SmolLM2, 1-1.5 ms a step on a 2-core CPU) are checked at the first compiled step of each
call only, once a graph has served a few thousand steps (a long-running process): the later steps of
a CPU call then run a pinned twin of the graph the first one picked (`kernelhub.runtime.pinned_step`),
whose build costs a second trace of the model. Dropping them process-wide (`set_stance(skip_guard_eval_unsafe=
True)`) would also drop them for another thread's compiled call of another model.

**A kept cache.** A finished call leaves its static cache with the model and the next call of
the same shape takes it, cleared (`kernelhub.runtime.kept_cache`): its tensors keep their
addresses from call to call, which CUDA-graph trees need to replay what they recorded.

**CUDA graphs.** On a CUDA device the step is also captured (inductor's CUDA-graph trees) and
replayed: one capture per cache-length and batch-size bucket. Capture needs what the points above give, a
step with nothing that varies on the host, plus two things: the tensors it writes in place (the
cache) have fixed addresses (`StaticCache` marks them so), and its output is copied out before
the next replay overwrites it (`compiled_steps` does).

>>> [static_cache_length(n) for n in (5, 64, 65, 300, 1500)]
[64, 64, 128, 512, 2048]
>>> [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 33)]
[1, 2, 4, 8, 8, 16, 40]
"""

from __future__ import annotations

import torch

from kernelhub.declare.binding import is_pinned
from kernelhub.declare.layer import layer_name
from kernelhub.runtime import pinned_step

MIN_BUCKET = 64
LINEAR_ABOVE = 1024  # powers of two up to here, then multiples of it (bounded padding, few buckets)
MAX_GRAPHS = 64  # dynamo's per-function graph limit while decoding (its default of 8 is a few buckets)


def static_cache_length(positions: int) -> int:
    """The bucketed length of a static cache that must hold `positions` positions."""
    if positions <= LINEAR_ABOVE:
        return max(MIN_BUCKET, 1 << (positions - 1).bit_length())
    return -(-positions // LINEAR_ABOVE) * LINEAR_ABOVE


def batch_bucket(batch: int) -> int:
    """The batch a compiled decode step runs for `batch` rows: 1, 2, 4 or 8, then the next multiple of
    8 (at most 7 filler rows: few graphs, little waste)."""
    return 1 << (batch - 1).bit_length() if batch <= 8 else -(-batch // 8) * 8


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t` [B, ...] with copies of its first row appended up to `rows` rows: filler rows that are real
    sequences (a row of padding only would attend to nothing), whose outputs the caller drops.

    >>> pad_rows(torch.tensor([[1, 2], [3, 4], [5, 6]]), 4).tolist()
    [[1, 2], [3, 4], [5, 6], [1, 2]]
    """
    extra = rows - t.shape[0]
    return t if extra == 0 else torch.cat([t, t[:1].expand(extra, *t.shape[1:])])


def decode_step(model, ids, positions, padding, cache):
    """Logits [B, V] of the last position after feeding `ids` [B, 1] at `positions` [B, 1]; `padding`
    [B, cache length] marks real tokens (1) over the whole cache, so its shape never changes."""
    return model(ids, attention_mask=padding, position_ids=positions, cache=cache, logits_to_keep=1).logits[:, -1]


_compiled: dict = {}


def compiled_decode_step(cuda_graphs: bool = False, cpp_wrapper: bool = False):
    """`decode_step` under `torch.compile(fullgraph=True, dynamic=False)`, built once per process (and
    once more with CUDA-graph capture, for steps on a CUDA device, or with inductor's C++ wrapper)."""
    key = (cuda_graphs, cpp_wrapper)
    if key not in _compiled:
        # Shapes are static, so dynamo's guards already check every input's size and stride before
        # the graph runs; inductor's own per-call re-check of each of its ~300 inputs is dropped.
        options = {"size_asserts": False, **(cuda_graph_options() if cuda_graphs else {}),
                   **({"cpp_wrapper": True} if cpp_wrapper else {})}
        _compiled[key] = torch.compile(decode_step, fullgraph=True, dynamic=False, options=options)
    return _compiled[key]


def wants_cpp_wrapper(model, device: torch.device) -> bool:
    """Whether a CPU decode step of `model` is worth inductor's C++ wrapper: one whose weights stay in
    packed GGUF blocks (`QuantizedLinear`). Its kernels are short (SmolLM2-135M Q4_1: about 10 ms a
    token), so the Python that calls them, about 150 calls a step, is a tenth of the step; in C++ it
    is gone, for about 30 s more the first time each shape bucket compiles (cached on disk after).
    Other models keep the Python wrapper, which compiles faster."""
    return device.type == "cpu" and any(layer_name(m) == "QuantizedLinear" for m in model.modules())


def cuda_graph_options() -> dict:
    """inductor's options for capturing a compiled step as CUDA graphs, split around any op that cannot
    be captured (`graph_partition`: torch's default from 2.9, absent before 2.8)."""
    options = {"triton.cudagraphs": True}
    if hasattr(torch._inductor.config, "graph_partition"):
        options["graph_partition"] = True
    return options


STEP_ARGUMENTS = ("model", "ids", "positions", "padding", "cache")  # decode_step's parameters


def compiled_steps(model, cpp_wrapper: bool = False):
    """The compiled decode steps of one `generate` call: `step(ids, positions, padding, cache)` runs one
    over the static `cache` (see the module docstring), advances it and returns the logits.
    `cpp_wrapper` picks the graph built with inductor's C++ wrapper (`wants_cpp_wrapper`). On the CPU,
    the call's later steps skip dynamo's guards on the model (`kernelhub.runtime.pinned_step`) when the
    call holds the model `declare.binding.pinned`, as `model.generate` does, and its graph has a
    pinned twin (built once the graph has run `pinned_step.PIN_AFTER_STEPS` steps); otherwise every
    step checks them."""
    run = pinned_step.one_call(decode_step, STEP_ARGUMENTS, lambda: pinned_decode_step(cpp_wrapper), cpp_wrapper)

    def step(ids, positions, padding, cache):
        view = cache.step_view(ids.shape[1])
        cuda_graphs = ids.device.type == "cuda"
        try:
            with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
                if cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
                # a call that does not pin the model keeps the full guards: a rebind could land mid-call
                logits = run(compiled_decode_step(cuda_graphs, cpp_wrapper), (model, ids, positions, padding, view),
                             not cuda_graphs and is_pinned(model))
        except torch._dynamo.exc.TorchDynamoException as e:
            raise compile_failure(e, "generate(compile=True)") from e
        cache.seen += ids.shape[1]
        return logits.clone() if cuda_graphs else logits  # a replay overwrites the captured output in place

    return step


def pinned_decode_step(cpp_wrapper: bool):
    """`decode_step` compiled as `compiled_decode_step` compiles it, from a code object of its own,
    without the guards on the model but for its tensors' (`kernelhub.runtime.pinned_step`)."""
    options = {"size_asserts": False, "guard_filter_fn": pinned_step.drop_model_guards,
               **({"cpp_wrapper": True} if cpp_wrapper else {})}
    return torch.compile(pinned_step.code_copy(decode_step), fullgraph=True, dynamic=False, options=options)


def compile_failure(error: Exception, call: str) -> RuntimeError:
    """The error to raise when torch.compile cannot build a step: what failed, and what to do instead."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return RuntimeError(f"{call} could not compile the model's step as one graph ({type(error).__name__}: "
                        f"{first}); bind kernels that can run under torch.compile (load with "
                        f"mode='inference|compile' to refuse the others), or run without compile=True")
