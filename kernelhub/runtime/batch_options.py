"""What a continuous-batching request may ask for: the sampling options batching honours, merged
as `generate` merges them, the per-request logits processing and stop strings `generate` applies,
and prompts as lists of token ids. Anything else is refused with the reason, never ignored.

>>> batch_sampling(SamplingParams(max_new_tokens=4)).max_new_tokens
4
>>> as_token_list(torch.tensor([1, 2]), "prompt 0", vocab_size=8)
[1, 2]
"""

from __future__ import annotations

import torch

from kernelhub.declare.errors import SamplingError
from kernelhub.runtime.generate import config_defaults, set_fields, stop_string_hits
from kernelhub.runtime.sampling import SamplingParams, process_logits


# What per-prompt `generate` does that continuous batching does not (yet): refused, never ignored.
# (max_length counts the prompt: batching bounds each request by max_new_tokens alone.)
_NOT_BATCHED = {"max_length": None}


def batch_defaults(model, sampling, options: dict) -> dict:
    """The options of this batch merged as `generate` merges them (generation config, then
    `sampling`, then keywords), taking from the generation config only what batching honours."""
    honoured = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
                "min_new_tokens", "repetition_penalty")
    from_config = {k: v for k, v in config_defaults(model).items() if k in honoured}
    return {**from_config, **set_fields(sampling), **options}


def batch_sampling(params: SamplingParams, tokenizer=None) -> SamplingParams:
    """`params` if continuous batching honours every field that is set; a clear error otherwise
    (`stop_strings` need the `tokenizer` that reads the generated text)."""
    unsupported = [f"{name}={getattr(params, name)!r}" for name, off in _NOT_BATCHED.items()
                   if getattr(params, name) != off]
    if unsupported:
        raise SamplingError(f"continuous batching does not support {', '.join(unsupported)}; use model.generate "
                            "for these, or leave them at their defaults (max_new_tokens bounds each request)")
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer to read the text: pass tokenizer=...")
    return params


def processed_logits(logits: torch.Tensor, requests) -> torch.Tensor:
    """`logits` [N, V] (one row per request) with each request's `repetition_penalty` and
    `min_new_tokens` applied to its own row by `process_logits` (in float32, as `generate` does);
    unchanged when no request needs it. A request has `sampling`, `tokens` (prompt and generated)
    and `generated` (how many of them are new)."""
    rows = [i for i, r in enumerate(requests) if r.sampling.repetition_penalty != 1.0
            or (r.generated < r.sampling.min_new_tokens and r.sampling.eos_token_ids)]
    if not rows:
        return logits
    logits = logits.float().clone()
    for i in rows:
        request = requests[i]
        seen = torch.tensor([request.tokens], dtype=torch.long, device=logits.device)
        logits[i:i + 1] = process_logits(logits[i:i + 1], request.sampling, seen, request.generated)
    return logits


def hits_stop_string(tokenizer, request) -> bool:
    """Whether the request's generated text now holds one of its `stop_strings`, read as `generate` reads it."""
    stops = request.sampling.stop_strings
    if not stops:
        return False
    return bool(stop_string_hits(tokenizer, torch.tensor([request.tokens[-request.generated:]]), stops)[0])


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
