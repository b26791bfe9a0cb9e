"""Sampling options, validated once, and the one function that picks the next token.

`generate`, `generate_batch` and `ContinuousBatcher` all take `sampling=SamplingParams(...)` or
the same options as keywords; both routes go through `SamplingParams.from_kwargs`.

>>> params = SamplingParams.from_kwargs(do_sample=True, temperature=0.7, top_k=20, seed=0)
>>> params.top_k, params.max_new_tokens
(20, 32)
>>> SamplingParams(top_p=1.5)
Traceback (most recent call last):
...
kernelhub.declare.errors.SamplingError: top_p must be None (off) or a number in (0, 1], got 1.5 (float)
>>> sample(torch.tensor([[0.0, 3.0, 1.0]]), SamplingParams())  # greedy
tensor([1])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers

import torch

from kernelhub.declare.errors import SamplingError


def _int(v, lo, hi=math.inf) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _token_ids(v) -> bool:
    return _int(v, 0) or (isinstance(v, (list, tuple)) and all(_int(t, 0) for t in v))


# field -> (accepts the value, what is allowed); the messages read "<field> must be <allowed>, got ...".
_RULES = {
    "max_new_tokens": (lambda v: _int(v, 1), "a positive int"),
    "do_sample": (lambda v: isinstance(v, bool), "True or False"),
    "temperature": (lambda v: _real(v) and v > 0, "> 0 (a finite number; do_sample=False is greedy)"),
    "top_k": (lambda v: v is None or _int(v, 1), "None (off) or an int >= 1"),
    "top_p": (lambda v: v is None or (_real(v) and 0 < v <= 1), "None (off) or a number in (0, 1]"),
    "eos_token_id": (lambda v: v is None or _token_ids(v), "None, a token id (an int >= 0) or a list of them "
                     "([] for none: generation ends only at the length limit)"),
    "seed": (lambda v: v is None or _int(v, 0, 2**64 - 1), "None or an int in 0..2**64-1"),
    "min_new_tokens": (lambda v: _int(v, 0), "an int >= 0"),
    "max_length": (lambda v: v is None or _int(v, 1), "None or a positive int (prompt + new tokens)"),
    "repetition_penalty": (lambda v: _real(v) and v > 0, "> 0 (a finite number; 1.0 is off)"),
    "pad_token_id": (lambda v: v is None or _int(v, 0), "None or a token id (an int >= 0)"),
    "stop_strings": (lambda v: isinstance(v, tuple) and all(isinstance(t, str) and t for t in v),
                     "a string or a list of non-empty strings"),
}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop. Immutable: share one across calls and threads.

    `do_sample=False` is greedy (argmax; temperature, top_k, top_p are then unused). `seed`
    seeds a fresh generator per call (per request in a batcher), so results do not depend on
    what else runs; pass `generator=` to the caller instead to draw from your own stream.
    As in transformers: `eos_token_id` may be a list (any of them ends a row); finished rows
    are filled with `pad_token_id` (default: the first eos id); `min_new_tokens` bans eos
    until that many tokens are out; `repetition_penalty` divides (multiplies, if negative)
    the logits of every token already in the sequence; `max_length` limits prompt + new
    tokens when `max_new_tokens` is not given in the same call; generation stops after any of
    `stop_strings` appears in the generated text (the caller needs a tokenizer).

    >>> SamplingParams(max_new_tokens=8, eos_token_id=2)
    SamplingParams(max_new_tokens=8, do_sample=False, temperature=1.0, top_k=None, top_p=None, eos_token_id=2, ...)
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | tuple | None = None
    seed: int | None = None
    min_new_tokens: int = 0
    max_length: int | None = None
    repetition_penalty: float = 1.0
    pad_token_id: int | None = None
    stop_strings: tuple = ()

    def __post_init__(self):
        # lists become tuples: the params stay immutable and hashable
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.stop_strings, (str, list)):
            stops = (self.stop_strings,) if isinstance(self.stop_strings, str) else tuple(self.stop_strings)
            object.__setattr__(self, "stop_strings", stops)
        for name, (ok, allowed) in _RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise SamplingError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")

    @property
    def eos_token_ids(self) -> tuple:
        """`eos_token_id` as a tuple (empty when None)."""
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (eos,)

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, /, *, also: tuple = (), caller: str = "sampling",
                    **kwargs: object) -> SamplingParams:
        """`base` (default: all defaults) with the given fields replaced; unknown keywords are an error.

        `also` names the caller's own keywords, listed with the fields when a keyword is unknown
        (`generate` passes its own, so the message lists everything `generate` accepts).

        >>> SamplingParams.from_kwargs(SamplingParams(top_k=5), temperature=0.5).top_k
        5
        >>> SamplingParams.from_kwargs(temprature=0.5)
        Traceback (most recent call last):
        ...
        kernelhub.declare.errors.SamplingError: unknown sampling options ['temprature']; valid: temperature, ...
        """
        if base is None:
            base = cls()
        elif not isinstance(base, cls):
            raise SamplingError(f"sampling must be a SamplingParams, got {type(base).__name__}; "
                                "build one with SamplingParams(...) or pass the options as keywords")
        unknown = sorted(set(kwargs) - set(_RULES))
        if unknown:
            raise SamplingError(f"unknown {caller} options {unknown}; valid: "
                                f"{', '.join(valid_names(unknown, [*_RULES, *also]))}")
        return dataclasses.replace(base, **kwargs) if kwargs else base


def valid_names(unknown, names) -> list[str]:
    """`names` sorted, each close match of an `unknown` name (a did-you-mean) moved to the front.

    >>> valid_names(["temprature"], ["top_k", "seed", "temperature", "do_sample"])
    ['temperature', 'do_sample', 'seed', 'top_k']
    >>> valid_names(["num_beams"], ["top_k", "seed"])
    ['seed', 'top_k']
    """
    names = sorted(set(names))
    near = [m for u in unknown for m in difflib.get_close_matches(u, names, n=1, cutoff=0.6)]
    near = list(dict.fromkeys(near))
    return near + [n for n in names if n not in near]


def make_generator(params: SamplingParams, device, generator: torch.Generator | None = None):
    """The generator to draw from: `generator`, or a fresh one seeded with `params.seed`, or None."""
    if generator is not None and params.seed is not None:
        raise SamplingError(f"pass seed ({params.seed}) or generator, not both: a seed makes its own generator")
    if params.seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(params.seed)


def process_logits(logits: torch.Tensor, params: SamplingParams, sequences: torch.Tensor, new_tokens: int):
    """Float32 scores for the next token of each row: `repetition_penalty` over the tokens in
    `sequences` [B, T] (prompt included, as transformers), then eos banned while fewer than
    `min_new_tokens` (`new_tokens` so far) are out.

    >>> process_logits(torch.tensor([[2.0, -2.0, 1.0]]), SamplingParams(repetition_penalty=2.0),
    ...                torch.tensor([[0, 1]]), 0).tolist()
    [[1.0, -4.0, 1.0]]
    """
    scores = logits.float()
    if params.repetition_penalty != 1.0:
        seen = scores.gather(-1, sequences)
        seen = torch.where(seen < 0, seen * params.repetition_penalty, seen / params.repetition_penalty)
        scores = scores.scatter(-1, sequences, seen)
    if new_tokens < params.min_new_tokens and params.eos_token_ids:
        scores = scores.clone()
        in_vocab = [e for e in params.eos_token_ids if e < scores.shape[-1]]  # an id past the vocabulary never comes
        scores[:, in_vocab] = float("-inf")
    return scores


def warp(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering, in transformers' order; greedy: unchanged."""
    if not params.do_sample:
        return scores
    scores = scores.float() / params.temperature
    if params.top_k is not None:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1])).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the token that crosses top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def pick(scores: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Argmax (greedy) or one draw from softmax(`scores`) per row; returns [B] token ids."""
    if not params.do_sample:
        return argmax_rows(scores)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def argmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(-1)` of [B, V] scores, the same index (the first maximum; the first NaN where there
    is one), found a span at a time: torch's argmax scans a row on one thread without vectors, about
    0.6 ms for Gemma 3's 262,144 scores on a CPU core, a few percent of a decode step. The spans'
    maxima (`amax`, vectorised and split across threads) name the span to scan.

    >>> scores = torch.zeros(2, 8192)
    >>> scores[0, 5000] = 5.0; scores[1, 17] = scores[1, 8000] = 1.0
    >>> argmax_rows(scores).tolist()
    [5000, 17]
    """
    if scores.dim() != 2 or scores.device.type != "cpu":  # a GPU's argmax is one parallel kernel already
        return scores.argmax(-1)
    rows, vocab = scores.shape
    span = min(vocab & -vocab, 1024)  # the largest power of two dividing the vocabulary, at most 1024
    if span < 64 or vocab // span < 8:
        return scores.argmax(-1)
    spans = scores.reshape(rows, vocab // span, span)
    outer = spans.amax(-1).argmax(-1)  # the first span holding the maximum (or a NaN)
    inner = spans[torch.arange(rows, device=scores.device), outer].argmax(-1)
    return outer * span + inner


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of [B, V] `logits`; returns [B] token ids (`pick(warp(logits))`).

    Order as in transformers: temperature, then top-k, then top-p (nucleus) filtering.
    """
    return pick(warp(logits, params), params, generator)
