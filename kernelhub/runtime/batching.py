"""Continuous batching: many requests share each forward, over a paged KV cache.

Every step the scheduler packs work into one row of at most `max_batch_tokens` tokens:

1. **decode first**: each running request past its prompt brings its one newest token;
2. **chunked prefill** fills the rest of the budget with prompt chunks, oldest request first,
   admitting waiting requests while blocks last;
3. **preemption**: when a decode needs a block and none is free, the most recently admitted
   request gives back all its blocks and is requeued at the front with the tokens it has
   (prompt and generated). It later recomputes them, so nothing is lost or duplicated.

The forward is packed (varlen): no padding and no [tokens x tokens] mask; each attention backend
reads keys through the block tables (see `backends.paged_attention`).

>>> from kernelhub.models.llama import LlamaForCausalLM
>>> model = LlamaForCausalLM({"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
...                           "num_hidden_layers": 1, "num_attention_heads": 2})
>>> results = generate_batch(model, [[1, 2, 3], [4]], max_new_tokens=2)
>>> [len(r.tokens) for r in results], results[0].finish_reason
([2, 2], 'length')
>>> results.stats["steps"]  # this call's counters
2
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

import torch

from kernelhub.declare.log import progress as progress_bar
from kernelhub.declare.paged_cache import PagedKVCache
from kernelhub.declare.site import AttentionSite
from kernelhub.runtime import kept_cache
from kernelhub.runtime.batch_options import (as_token_list, batch_defaults, batch_sampling, hits_stop_string,
                                             processed_logits)
from kernelhub.runtime.compiled_batching import CompiledStep
from kernelhub.runtime.sampling import SamplingParams, make_generator, sample
from kernelhub.runtime.tensor_parallel_sync import agreed_min, same_on_every_rank

DEFAULT_BATCH_TOKENS = 2048
DEFAULT_BLOCK_SIZE = 16


def default_kv_memory(device) -> int:
    """The KV pool budget when none is given: half the free memory of a GPU, 1 GiB on a CPU
    (SmolLM2-135M in float32: 22,700 positions). `generate_batch` allocates no more than its
    workload can use; a `ContinuousBatcher` allocates its whole budget up front."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    return 1 << 30


@dataclasses.dataclass
class GenerationResult:
    """A finished request: `tokens` are the generated ids (eos included when it ended one)."""

    request_id: object
    prompt: list[int]
    tokens: list[int]
    finish_reason: str  # "length" | "eos" | "stop" (one of stop_strings) | "cancelled" | "error"
    error: str | None = None


class BatchResults(list):
    """The `GenerationResult`s of one `generate_batch` call, in prompt order (a plain list), with
    `stats`: that call's counters (steps, tokens, preemptions, peak_blocks, kv_memory_bytes,
    block_size, num_blocks; with `compile=True`, token_buckets: the padded row lengths compiled
    for). Per call, so concurrent calls never see each other's."""

    def __init__(self, results, stats: dict):
        super().__init__(results)
        self.stats = stats


@dataclasses.dataclass(eq=False)  # identity: `in`/`remove` on queues must not compare token lists
class _Request:
    id: object
    prompt: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None  # the batcher's, or the request's own when it has a seed
    tokens: list[int] = dataclasses.field(default_factory=list)  # prompt + generated
    computed: int = 0  # positions whose keys/values are in the cache

    @property
    def pending(self) -> int:
        return len(self.tokens) - self.computed

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    def result(self, reason, error=None):
        return GenerationResult(self.id, self.prompt, self.tokens[len(self.prompt):], reason, error)


def _sites_without_paged(model) -> list[str]:
    return [f"{path} ({site.implementation})" for path, site in model.named_modules()
            if isinstance(site, AttentionSite) and site.paged_fn is None]


class ContinuousBatcher:
    """A streaming manager: add requests at any time, iterate results as they finish, cancel.

    >>> from kernelhub.models.llama import LlamaForCausalLM
    >>> model = LlamaForCausalLM({"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
    ...                           "num_hidden_layers": 1, "num_attention_heads": 2})
    >>> batcher = ContinuousBatcher(model, kv_memory=1 << 20)
    >>> a = batcher.add_request([1, 2, 3], max_new_tokens=4)
    >>> b = batcher.add_request([5, 6], max_new_tokens=100)
    >>> batcher.cancel(b)
    >>> sorted((r.request_id, r.finish_reason) for r in batcher)
    [(0, 'length'), (1, 'cancelled')]

    Used as a context manager (or with `close()`), a compiled batcher leaves its KV pool for the
    next compiled batcher of the same model and pool size, whose graphs then replay on the same
    addresses (as `generate_batch` does between calls).
    """

    def __init__(self, model, *, sampling: SamplingParams | None = None, max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_memory: int | None = None, max_blocks: int | None = None,
                 generator: torch.Generator | None = None, compile: bool = False, tokenizer=None, **options):
        """`sampling` (or its fields as keyword `options`) is every request's default; a request
        with a `seed` draws from its own generator, the others from `generator`. `compile=True`
        runs each step as a compiled graph, one per token-count bucket
        (`kernelhub.runtime.compiled_batching`); results equal the uncompiled steps'. `tokenizer`
        reads the generated text for requests with `stop_strings`."""
        self.tokenizer = tokenizer
        self.sampling = batch_sampling(SamplingParams.from_kwargs(None, **batch_defaults(model, sampling, options)),
                                       tokenizer)
        not_paged = _sites_without_paged(model)
        if not_paged:
            raise ValueError(f"continuous batching reads a paged KV cache, and these attention sites are bound "
                             f"to backends without paged support: {', '.join(not_paged[:4])}; bind with "
                             "attn_implementation='paged|sdpa' (or eager, flex, flash)")
        if compile not in (True, False):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        if max_batch_tokens < 1 or block_size < 1:
            raise ValueError(f"max_batch_tokens and block_size must be >= 1, got {max_batch_tokens}, {block_size}")
        self.model = model
        self.device = next(model.parameters()).device
        make_generator(self.sampling, self.device, generator)  # refuses a seed together with a generator
        self.generator = generator
        self.max_batch_tokens = max_batch_tokens
        # Under tensor parallelism the ranks schedule alike: one budget, the smallest (free memory differs).
        memory = agreed_min(model, kv_memory or default_kv_memory(self.device))
        self.cache_spec = PagedKVCache.spec_for_model(model, memory_bytes=memory, block_size=block_size,
                                                      max_blocks=max_blocks)
        make = lambda: PagedKVCache(**self.cache_spec)  # noqa: E731
        # Compiled steps run in the cache a finished compiled run left, when it has this spec: the same
        # pool addresses, so CUDA graphs captured then replay now (`generate_batch` leaves it).
        self.cache = kept_cache.take(model, "paged", self.cache_spec, make) if compile else make()
        self.compiled = CompiledStep(model, self.cache, max_batch_tokens) if compile else None
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: list[_Request] = []  # in admission order
        self.finished: list[GenerationResult] = []
        self._ids = itertools.count()
        self.stats = collections.Counter()
        self.closed = False

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> list[GenerationResult]:
        """Finish with this batcher: cancel what is still waiting or running and return those
        results with any not yet read. A compiled batcher leaves its KV pool with the model for the
        next compiled one of the same spec (`kernelhub.runtime.kept_cache`); either way the batcher
        lets go of its pool. Closing twice is a no-op; after `close`, adding a request or running a
        step raises, and iterating yields nothing. Not thread-safe: close from the thread that steps."""
        if self.closed:
            return []
        for request in [*self.running, *self.waiting]:
            self.cancel(request.id)
        done, self.finished = self.finished, []
        self.closed = True
        if self.compiled is not None:
            kept_cache.keep(self.model, "paged", self.cache_spec, self.cache)
        self.cache = self.compiled = None  # a pool kept or dropped is no longer this batcher's
        return done

    def __enter__(self) -> "ContinuousBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _refuse_if_closed(self, doing: str) -> None:
        if self.closed:
            raise RuntimeError(f"cannot {doing}: this ContinuousBatcher is closed (its KV pool may already "
                               "serve another batcher); make a new one")

    # -- requests --------------------------------------------------------------------

    def add_request(self, prompt, *, request_id=None, sampling: SamplingParams | None = None, **options):
        """Queue a prompt (token ids); returns its id. A prompt that can never fit the KV cache
        finishes at once with `finish_reason="error"` and the reason, without affecting others.

        `sampling` replaces the batcher's `SamplingParams` for this request; keyword `options`
        (`max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`, `seed`,
        `min_new_tokens`, `repetition_penalty`, `stop_strings`) override single fields of it."""
        self._refuse_if_closed("add a request")
        params = batch_sampling(SamplingParams.from_kwargs(self.sampling if sampling is None else sampling, **options),
                                self.tokenizer)
        tokens = as_token_list(prompt, "prompt", self.model.config.vocab_size)
        request_id = next(self._ids) if request_id is None else request_id
        if request_id in self._active_ids():
            raise ValueError(f"request id {request_id!r} is already in use")
        generator = self.generator if params.seed is None else make_generator(params, self.device)
        request = _Request(request_id, tokens, params, generator, tokens=list(tokens))
        max_new_tokens = params.max_new_tokens
        need = len(tokens) + max_new_tokens
        if need > self.cache.capacity():
            self.finished.append(request.result("error", (
                f"prompt of {len(tokens)} tokens plus max_new_tokens={max_new_tokens} needs {need} KV positions; "
                f"the cache holds {self.cache.capacity()} ({self.cache.num_blocks - 1} blocks of "
                f"{self.cache.block_size}); raise kv_memory or shorten the request")))
        else:
            self.waiting.append(request)
        return request_id

    def cancel(self, request_id):
        """Stop a waiting or running request; it finishes with `finish_reason="cancelled"`."""
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.id == request_id:
                    queue.remove(request)
                    self.cache.free(request.id)
                    self.finished.append(request.result("cancelled"))
                    return
        active = sorted(map(repr, self._active_ids()))
        raise KeyError(f"no waiting or running request {request_id!r} to cancel; active: "
                       f"{', '.join(active[:8]) or 'none'}")

    def _active_ids(self):
        return {r.id for r in itertools.chain(self.waiting, self.running)}

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.finished)

    def __iter__(self):
        """Run steps until every request has finished, yielding each result as it finishes."""
        while self.has_work:
            yield from self.step()

    # -- one step --------------------------------------------------------------------

    def step(self) -> list[GenerationResult]:
        """Schedule and run one forward; return the requests that finished."""
        self._refuse_if_closed("run a step")
        scheduled = self._schedule()
        if scheduled:
            self._run(scheduled)
        done, self.finished = self.finished, []
        return done

    def _preempt(self, victim: _Request):
        self.running.remove(victim)
        self.cache.free(victim.id)
        victim.computed = 0
        self.waiting.appendleft(victim)
        self.stats["preemptions"] += 1

    def _schedule(self) -> list[tuple[_Request, int]]:
        cache, budget, scheduled = self.cache, self.max_batch_tokens, []
        # 1. decode first, preempting the newest requests for blocks
        for request in list(self.running):
            if request.pending != 1 or request not in self.running or budget == 0:
                continue
            while not cache.can_reserve(request.id, request.computed + 1):
                self._preempt(self.running[-1])
                if request not in self.running:
                    break
            else:
                cache.reserve(request.id, request.computed + 1)
                scheduled.append((request, 1))
                budget -= 1
        # 2. chunked prefill: running requests part-way through a prompt, then new ones
        for request in [r for r in self.running if r.pending > 1] + list(self.waiting):
            if budget == 0:
                break
            fits = self._positions_free(request) - request.computed
            chunk = min(request.pending, budget, fits)
            if chunk <= 0:
                break  # no blocks left: admit nothing newer (first come, first served)
            cache.reserve(request.id, request.computed + chunk)
            if request in self.waiting:
                self.waiting.remove(request)
                self.running.append(request)
            scheduled.append((request, chunk))
            budget -= chunk
        return scheduled

    def _sample(self, logits, requests) -> list[int]:
        """Next tokens: one batched draw when every request draws alike, else one draw per request.
        Repetition penalty and min_new_tokens change each request's own row first, as in `generate`."""
        if not requests:
            return []
        logits = processed_logits(logits, requests)
        if len({_draw_key(r) for r in requests}) == 1:
            return sample(logits, requests[0].sampling, requests[0].generator).tolist()
        return [int(sample(logits[i:i + 1], r.sampling, r.generator)[0]) for i, r in enumerate(requests)]

    def _positions_free(self, request) -> int:
        """Positions `request` could hold with its blocks plus every free block."""
        table = self.cache.tables.get(request.id)
        held = len(next(iter(table.values()))) if table else 0
        return (held + min(self.cache.free_blocks().values())) * self.cache.block_size

    @torch.inference_mode()
    def _run(self, scheduled):
        cache = self.cache
        q_lens = [n for _, n in scheduled]
        kv_lens = [r.computed + n for r, n in scheduled]
        positions = cache.begin_step([r.id for r, _ in scheduled], q_lens, kv_lens)
        ids = torch.tensor([t for r, n in scheduled for t in r.tokens[r.computed:r.computed + n]],
                           device=self.device)[None]
        ends = list(itertools.accumulate(q_lens))
        sampling = [i for i, (r, n) in enumerate(scheduled) if r.computed + n == len(r.tokens)]
        keep = torch.tensor([ends[i] - 1 for i in sampling], dtype=torch.long, device=self.device)
        if self.compiled is not None:
            logits = self.compiled(ids[0], positions.to(self.device), keep)
        else:
            logits = self.model(ids, position_ids=positions.to(self.device)[None], cache=cache,
                                logits_to_keep=keep).logits[0]
        nxt = self._sample(logits, [scheduled[i][0] for i in sampling])
        if nxt:  # rank 0's tokens on every rank: scheduling depends only on requests, blocks and tokens
            nxt = same_on_every_rank(self.model, torch.tensor(nxt, dtype=torch.long, device=self.device)).tolist()
        self.stats["steps"] += 1
        self.stats["tokens"] += len(q_lens)
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], cache.used_blocks())
        for (request, n) in scheduled:
            request.computed += n
        for i, token in zip(sampling, nxt):
            request = scheduled[i][0]
            request.tokens.append(token)
            eos = token in request.sampling.eos_token_ids
            stop = not eos and hits_stop_string(self.tokenizer, request)
            if eos or stop or request.generated >= request.sampling.max_new_tokens:
                self.running.remove(request)
                cache.free(request.id)
                self.finished.append(request.result("eos" if eos else "stop" if stop else "length"))
        for request, _ in scheduled:
            if request in self.running:
                cache.release_outside_window(request.id, request.computed)


def _draw_key(request: _Request):
    """Requests with equal keys can share one batched draw: greedy ones always can."""
    p = request.sampling
    return (p.temperature, p.top_k, p.top_p, id(request.generator)) if p.do_sample else "greedy"


def generate_batch(model, prompts, *, sampling: SamplingParams | None = None,
                   max_batch_tokens: int = DEFAULT_BATCH_TOKENS, block_size: int = DEFAULT_BLOCK_SIZE,
                   kv_memory: int | None = None, generator: torch.Generator | None = None, progress: bool = False,
                   compile: bool = False, tokenizer=None, **options) -> BatchResults:
    """Generate for every prompt (lists of token ids) with continuous batching; results in prompt order,
    with this call's counters in `.stats`.

    `sampling` is a `SamplingParams`; `options` are its fields as keywords and override it.
    The KV pool is sized from `kv_memory` (bytes; default `default_kv_memory`) but never larger
    than this workload can use. A request that cannot fit it finishes with an error; the others run.
    `progress=True` shows a bar of finished requests on stderr (off whenever
    `HF_HUB_DISABLE_PROGRESS_BARS=1`; see `kernelhub.declare.log.progress`).
    `compile=True` compiles the step once per token-count bucket (packed rows are padded to powers
    of two up to `max_batch_tokens`; see `kernelhub.runtime.compiled_batching`): worth it for long
    runs, where the compilations are paid once; results equal the uncompiled run's.
    `min_new_tokens`, `repetition_penalty` and `stop_strings` work as in `generate` (greedy tokens
    equal per-prompt `generate`'s); `stop_strings` need `tokenizer=`, and a request they end
    finishes with `finish_reason="stop"`.

    >>> model.generate_batch(prompts, max_new_tokens=64, compile=True)  # doctest: +SKIP
    """
    params = batch_sampling(SamplingParams.from_kwargs(None, **batch_defaults(model, sampling, options)), tokenizer)
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty; generate_batch needs at least one prompt")
    vocab = model.config.vocab_size
    prompts = [as_token_list(p, f"prompt {i}", vocab) for i, p in enumerate(prompts)]
    workload = 1 + sum(-(-(len(p) + params.max_new_tokens) // block_size) for p in prompts)
    if compile:  # the pool's size is part of the compiled graphs' shapes: bucket it too, so calls share them
        workload = 1 << (workload - 1).bit_length()
    # leaving the block closes the batcher: a compiled one leaves its pool for the next compiled run
    with ContinuousBatcher(model, sampling=params, max_batch_tokens=max_batch_tokens, block_size=block_size,
                           kv_memory=kv_memory, max_blocks=workload, generator=generator, compile=compile,
                           tokenizer=tokenizer) as batcher:
        for i, prompt in enumerate(prompts):
            batcher.add_request(prompt, request_id=i)
        # progress=False means no bar at all, not "a bar on a terminal only"; an asked-for bar stays when done
        with progress_bar(batcher, desc="generating", total=len(prompts), unit="request", leave=True,
                          disable=not progress) as finished:
            results = {r.request_id: r for r in finished}
        stats = dict(batcher.stats, kv_memory_bytes=batcher.cache.memory_bytes, block_size=block_size,
                     num_blocks=batcher.cache.num_blocks)
        if compile:
            stats["token_buckets"] = sorted(batcher.compiled.buckets)
    return BatchResults([results[i] for i in range(len(prompts))], stats)
