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
import math
import numbers

import torch

from kernelhub.declare.errors import SamplingError, closest_first


def _int(v, lo, hi=math.inf) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# field -> (accepts the value, what is allowed); the messages read "<field> must be <allowed>, got ...".
_RULES = {
    "max_new_tokens": (lambda v: _int(v, 1), "a positive int"),
    "do_sample": (lambda v: isinstance(v, bool), "True or False"),
    "temperature": (lambda v: _real(v) and v > 0, "> 0 (a finite number; do_sample=False is greedy)"),
    "top_k": (lambda v: v is None or _int(v, 1), "None (off) or an int >= 1"),
    "top_p": (lambda v: v is None or (_real(v) and 0 < v <= 1), "None (off) or a number in (0, 1]"),
    "eos_token_id": (lambda v: v is None or _int(v, 0), "None or a token id (an int >= 0)"),
    "seed": (lambda v: v is None or _int(v, 0, 2**64 - 1), "None or an int in 0..2**64-1"),
}


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop. Immutable: share one across calls and threads.

    `do_sample=False` is greedy (argmax; temperature, top_k, top_p are then unused). `seed`
    seeds a fresh generator per call (per request in a batcher), so results do not depend on
    what else runs; pass `generator=` to the caller instead to draw from your own stream.

    >>> SamplingParams(max_new_tokens=8, eos_token_id=2)
    SamplingParams(max_new_tokens=8, do_sample=False, temperature=1.0, top_k=None, top_p=None, eos_token_id=2, ...)
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: int | None = None
    seed: int | None = None

    def __post_init__(self):
        for name, (ok, allowed) in _RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise SamplingError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, /, **kwargs) -> SamplingParams:
        """`base` (default: all defaults) with the given fields replaced; unknown keywords are an error.

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
            raise SamplingError(f"unknown sampling options {unknown}; valid: "
                                f"{', '.join(closest_first(unknown[0], _RULES))}")
        return dataclasses.replace(base, **kwargs) if kwargs else base


def make_generator(params: SamplingParams, device, generator: torch.Generator | None = None):
    """The generator to draw from: `generator`, or a fresh one seeded with `params.seed`, or None."""
    if generator is not None and params.seed is not None:
        raise SamplingError(f"pass seed ({params.seed}) or generator, not both: a seed makes its own generator")
    if params.seed is None:
        return generator
    return torch.Generator(device=device).manual_seed(params.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of [B, V] `logits`; returns [B] token ids.

    Order as in transformers: temperature, then top-k, then top-p (nucleus) filtering.
    """
    if not params.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
