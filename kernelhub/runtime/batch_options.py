"""What a continuous-batching request may ask for: the sampling options batching honours, merged
as `generate` merges them, and prompts as lists of token ids. Anything else is refused with the
reason, never ignored.

>>> batch_sampling(SamplingParams(max_new_tokens=4)).max_new_tokens
4
>>> as_token_list(torch.tensor([1, 2]), "prompt 0", vocab_size=8)
[1, 2]
"""

from __future__ import annotations

import torch

from kernelhub.declare.errors import SamplingError
from kernelhub.runtime.generate import config_defaults, set_fields
from kernelhub.runtime.sampling import SamplingParams


# What per-prompt `generate` does that continuous batching does not (yet): refused, never ignored.
_NOT_BATCHED = {"min_new_tokens": 0, "max_length": None, "repetition_penalty": 1.0, "stop_strings": ()}


def batch_defaults(model, sampling, options: dict) -> dict:
    """The options of this batch merged as `generate` merges them (generation config, then
    `sampling`, then keywords), taking from the generation config only what batching honours."""
    honoured = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")
    from_config = {k: v for k, v in config_defaults(model).items() if k in honoured}
    return {**from_config, **set_fields(sampling), **options}


def batch_sampling(params: SamplingParams) -> SamplingParams:
    """`params` if continuous batching honours every field that is set; a clear error otherwise."""
    unsupported = [f"{name}={getattr(params, name)!r}" for name, off in _NOT_BATCHED.items()
                   if getattr(params, name) != off]
    if unsupported:
        raise SamplingError(f"continuous batching does not support {', '.join(unsupported)}; use model.generate "
                            "for these, or leave them at their defaults")
    return params


def as_token_list(prompt, where: str, vocab_size: int) -> list[int]:
    """`prompt` (a list or 1-D tensor of token ids) as a list; a clear error naming `where` otherwise."""
    if isinstance(prompt, torch.Tensor):
        if prompt.ndim != 1:
            raise ValueError(f"{where} must be a 1-D tensor of token ids, got shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if isinstance(prompt, str) or not hasattr(prompt, "__iter__"):
        raise ValueError(f"{where} must be a list of token ids, got {type(prompt).__name__} "
                         "(tokenize text first)")
    tokens = list(prompt)
    if not tokens:
        raise ValueError(f"{where} is empty; every prompt needs at least one token")
    bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where} has token ids outside 0..{vocab_size - 1}: {bad[:5]}")
    return tokens
