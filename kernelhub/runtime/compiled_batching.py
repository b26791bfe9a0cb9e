"""The compiled continuous-batching step: one graph per token-count bucket.

A batching step packs a varying number of tokens from a varying set of sequences. Compiled
as is, every new layout (token count, sequence count, longest key run) would be a new graph.
Instead:

- **the packed row is padded to a bucket** (`token_bucket`: powers of two, at least 8, at most
  `max_batch_tokens`). Padded slots carry token 0 at position 0 and write their keys and
  values into the pool's null block (block 0, never handed out, read only under a mask), so
  they touch no sequence's blocks; their outputs are never read.
- **attention is one opaque op** (`kernelhub::paged_step_attention`) whose inputs are tensors
  of the bucket's shape. Inside it, the site's bound paged function runs eagerly on the real
  tokens with the step's `PagedMask` (as in vLLM's unified attention op); the graph sees
  none of the step's layout, so nothing in it changes from step to step.
- **the sampled positions** (`logits_to_keep`, one per sequence that samples) have an unbacked
  symbolic length, so any count shares the bucket's graph.

Shapes are otherwise static (`dynamic=False`): a warm-up over the buckets compiles every graph
a workload needs, and later steps never recompile.

**Guards.** As in `generate(compile=True)`, within a call that pins the model
(`model.generate_batch(compile=True)`) each bucket's first step runs under dynamo's full guards and,
once that graph has a pinned twin (`kernelhub.runtime.pinned_step`: after `PIN_AFTER_STEPS` steps),
the bucket's later steps run the twin, which skips the guards on the model but for its tensors'.
A batcher used outside such a call, or past the end of the pin it started under, keeps the full
guards at every step.

**CUDA graphs.** On a CUDA device the step is captured piecewise, as vLLM does: the attention
op is tagged `cudagraph_unsafe`, so inductor splits the graph around it, captures the pieces
between (projections, norms, MLPs, the cache writes into pools with fixed addresses) per
bucket, and runs the op itself eagerly each step on that step's layout.

>>> [token_bucket(n, 2048) for n in (1, 8, 9, 600, 2048)]
[8, 8, 16, 1024, 2048]
>>> token_bucket(90, 100)
100
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from kernelhub.declare.binding import pin_of
from kernelhub.declare.paged import PagedMask
from kernelhub.declare.site import AttentionSite
from kernelhub.runtime import pinned_step
from kernelhub.runtime.compiled_decode import compile_failure, cuda_graph_options

MIN_BUCKET = 8
MAX_GRAPHS = 64  # dynamo's per-function graph limit while stepping (its default of 8 is a few buckets)

_current = threading.local()  # the running step: (sites by layer index, real masks, real token count)


def token_bucket(tokens: int, max_batch_tokens: int) -> int:
    """The padded length of a packed row of `tokens` tokens."""
    return min(max(MIN_BUCKET, 1 << (tokens - 1).bit_length()), max(max_batch_tokens, MIN_BUCKET))


# cudagraph_unsafe: it reads the running step's layout from Python, so a capture would replay a stale one
# (the tag exists from torch 2.8; before it, inductor does not capture around ops and needs none)
_UNCAPTURABLE = tuple(t for t in [getattr(torch._C.Tag, "cudagraph_unsafe", None)] if t is not None)


@torch.library.custom_op("kernelhub::paged_step_attention", mutates_args=(), tags=_UNCAPTURABLE)
def paged_step_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, sinks: torch.Tensor | None,
                         layer_idx: int) -> torch.Tensor:
    """Attention of layer `layer_idx` for the running step: q [1, H, T_bucket, D] -> [1, T_bucket, H, D].

    Reads the step's sites, masks and real token count from the running `CompiledStep`; the
    pools come in as inputs so that the graph orders this op after the step's cache writes."""
    sites, masks, tokens = _current.step
    site = sites[layer_idx]
    kw = {"softcap": site.softcap} if site.softcap else {}
    if sinks is not None:
        kw["sinks"] = sinks
    out, _ = site.binding.paged_fn(site, q[:, :, :tokens], k_pool, v_pool, masks[site.layer_type],
                                   scaling=site.scaling, dropout=0.0, **kw)
    return F.pad(out, (0, 0, 0, 0, 0, q.shape[2] - tokens))


@paged_step_attention.register_fake
def _(q, k_pool, v_pool, sinks, layer_idx):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])


class StepMask(PagedMask):
    """What a compiled step's sites see instead of a `PagedMask`: no layout, just the op."""

    def __init__(self):  # no per-step state: nothing for the compiler to specialise on
        pass

    def attend(self, fn, module, q, k_pool, v_pool, *, scaling, dropout=0.0, softcap=None, sinks=None):
        return torch.ops.kernelhub.paged_step_attention(q, k_pool, v_pool, sinks, module.layer_idx), None

    def __repr__(self):
        return "StepMask(the running compiled step's PagedMask)"


class StepCache:
    """The paged cache as a compiled step sees it: padded write slots and `StepMask`s."""

    paged = True

    def __init__(self, cache):
        self.layer_types = cache.layer_types
        self.keys, self.values = cache.keys, cache.values
        self.step_masks = {g: StepMask() for g in cache.groups}
        self.slots: dict = {}

    def update(self, k, v, layer_idx: int):
        """Write the padded row's k/v ([1, H_kv, T_bucket, D]) into the pools; return the pools."""
        slots = self.slots[self.layer_types[layer_idx]]
        k_pool, v_pool = self.keys[layer_idx], self.values[layer_idx]
        k_pool.view(-1, *k_pool.shape[2:])[slots] = k[0].transpose(0, 1).to(k_pool.dtype)
        v_pool.view(-1, *v_pool.shape[2:])[slots] = v[0].transpose(0, 1).to(v_pool.dtype)
        return k_pool, v_pool


STEP_ARGUMENTS = ("model", "ids", "positions", "keep", "cache")  # packed_step's parameters


def packed_step(model, ids, positions, keep, cache):
    """Logits [len(keep), V] of one packed row ([1, T]) over `cache`."""
    return model(ids, position_ids=positions, cache=cache, logits_to_keep=keep).logits[0]


_compiled: dict = {}


def compiled_packed_step(cuda_graphs: bool = False):
    """`packed_step` under `torch.compile(fullgraph=True, dynamic=False)`, built once per process (and
    once more with piecewise CUDA-graph capture, for steps on a CUDA device)."""
    if cuda_graphs not in _compiled:
        options = cuda_graph_options() if cuda_graphs else {}  # captured around the attention op
        _compiled[cuda_graphs] = torch.compile(packed_step, fullgraph=True, dynamic=False, options=options)
    return _compiled[cuda_graphs]


def pinned_packed_step():
    """`packed_step` compiled as `compiled_packed_step` compiles it for the CPU, from a code object of
    its own, without the guards on the model but for its tensors' (`kernelhub.runtime.pinned_step`)."""
    options = {"guard_filter_fn": pinned_step.drop_model_guards}
    return torch.compile(pinned_step.code_copy(packed_step), fullgraph=True, dynamic=False, options=options)


def _sites_by_layer(model) -> dict:
    sites = [m for m in model.modules() if isinstance(m, AttentionSite)]
    by_layer = {s.layer_idx: s for s in sites}
    if None in by_layer or len(by_layer) != len(sites):
        raise ValueError("compiling the batching step needs one attention site per layer, each with its "
                         "layer_idx; this model's sites do not say which layer they serve")
    return by_layer


class CompiledStep:
    """Runs a batcher's forwards compiled: `step(ids, positions, keep)` after the cache's `begin_step`."""

    def __init__(self, model, cache, max_batch_tokens: int):
        self.model, self.cache, self.max_batch_tokens = model, cache, max_batch_tokens
        self.sites = _sites_by_layer(model)
        self.view = StepCache(cache)
        self.buckets: set[int] = set()  # the token-count buckets this batcher's steps have used
        self.pin = None  # the model's pin on this thread that `runs` started under
        self.runs: dict = {}  # bucket -> its steps under that pin (`pinned_step.one_call`)

    def __call__(self, ids, positions, keep):
        """ids, positions: [T] for the real tokens; keep: [n] packed indices to compute logits for."""
        tokens = ids.shape[0]
        bucket = token_bucket(tokens, self.max_batch_tokens)
        self.buckets.add(bucket)
        pad = bucket - tokens
        ids, positions = F.pad(ids, (0, pad))[None], F.pad(positions, (0, pad))[None]
        self.view.slots = {g: F.pad(s, (0, pad)) for g, s in self.cache.step_slots().items()}  # pad -> block 0
        torch._dynamo.decorators.mark_unbacked(keep, 0)
        cuda_graphs = ids.device.type == "cuda"
        _current.step = (self.sites, self.cache.step_masks, tokens)
        try:
            with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
                if cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are no longer read
                logits = self._run(bucket, cuda_graphs, (self.model, ids, positions, keep, self.view))
        except torch._dynamo.exc.TorchDynamoException as e:
            raise compile_failure(e, "generate_batch(compile=True)") from e
        finally:
            _current.step = None
        return logits.clone() if cuda_graphs else logits  # a replay overwrites the captured output in place

    def _run(self, bucket: int, cuda_graphs: bool, args: tuple):
        """One step of `bucket`: through its graph's pinned twin where this thread's current pin of the
        model is the one its graph was picked under, else under the full guards (see the module
        docstring)."""
        pin = None if cuda_graphs else pin_of(self.model)
        if pin is not self.pin:  # a new pin (a rebind may have landed between) or none: pick afresh
            self.pin, self.runs = pin, {}
        if bucket not in self.runs:
            self.runs[bucket] = pinned_step.one_call(packed_step, STEP_ARGUMENTS, pinned_packed_step)
        return self.runs[bucket](compiled_packed_step(cuda_graphs), args, pin is not None)
