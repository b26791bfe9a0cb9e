"""Token generation: greedy or sampled, over a dynamic or static KV cache, with transformers' options.

Works for any causal model whose forward is `forward(input_ids, attention_mask,
position_ids, cache, logits_to_keep) -> output with .logits` and which offers
`make_cache(kind, ...)`. Options not passed come from `model.generation_config`.

>>> from kernelhub.models.llama import LlamaForCausalLM
>>> cfg = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
...        "num_hidden_layers": 1, "num_attention_heads": 2}
>>> model = LlamaForCausalLM(cfg)
>>> generate(model, torch.tensor([[1, 2]]), max_new_tokens=3).shape
torch.Size([1, 5])
>>> generate(model, [1, 2], sampling=SamplingParams(max_new_tokens=2, do_sample=True, seed=0)).shape
torch.Size([1, 4])
>>> out = generate(model, [1, 2], max_new_tokens=2, return_dict_in_generate=True, output_scores=True)
>>> out.sequences.shape, len(out.scores), out.scores[0].shape
(torch.Size([1, 4]), 2, torch.Size([1, 32]))
"""

from __future__ import annotations

import dataclasses
import torch

from kernelhub.checkpoint.generation_config import GenerationConfig
from kernelhub.declare.errors import KernelhubError, SamplingError
from kernelhub.runtime import kept_cache
from kernelhub.runtime.compiled_decode import (batch_bucket, pad_rows, compiled_steps, static_cache_length,
                                               wants_cpp_wrapper)
from kernelhub.models.outputs import GenerateOutput
from kernelhub.runtime.sampling import SamplingParams, make_generator, pick, process_logits, valid_names, warp
from kernelhub.runtime.tensor_parallel_sync import check_cache_heads, same_on_every_rank

CACHE_KINDS = ("dynamic", "static")
# generate's own keywords; together with SamplingParams' fields, everything generate accepts
GENERATE_OPTIONS = ("input_ids", "sampling", "attention_mask", "cache", "generator", "streamer", "tokenizer",
                    "return_dict_in_generate", "output_scores", "compile", "generation_config", "use_cache")
_SAMPLED_ONLY = ("temperature", "top_k", "top_p")  # a generation config's values, used only when it samples
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig) if f.name != "raw")


def refuse_beams(num_beams) -> None:
    """transformers' `num_beams`: 1 (or None) is what kernelhub does; more is one clear refusal."""
    if num_beams is not None and num_beams != 1:
        raise SamplingError(f"beam search is not supported; num_beams={num_beams!r} asks for it. generate decodes "
                            "greedily (do_sample=False) or samples (do_sample=True): leave num_beams at 1")


def as_generation_config(value) -> GenerationConfig | None:
    """A `generation_config=` argument as a `GenerationConfig`: one, or a dict of its fields (checked)."""
    if value is None or isinstance(value, GenerationConfig):
        return value
    if not isinstance(value, dict):
        raise SamplingError(f"generation_config must be a kernelhub GenerationConfig or a dict of its fields, got "
                            f"{type(value).__name__}")
    refuse_beams(value.get("num_beams"))
    unknown = sorted(set(value) - set(_CONFIG_FIELDS) - {"num_beams"})
    if unknown:
        raise SamplingError(f"unknown generation_config fields {unknown}; valid: "
                            f"{', '.join(valid_names(unknown, _CONFIG_FIELDS))}")
    return GenerationConfig.from_dict(value, "generation_config")


def config_defaults(model, generation_config: GenerationConfig | None = None) -> dict:
    """SamplingParams keywords from `model.generation_config`, each field `generation_config` sets
    overriding it (sampling settings only if the result samples)."""
    gc = getattr(model, "generation_config", None)
    defaults = gc.sampling_defaults() if gc is not None else {}
    if generation_config is not None:
        defaults = {**defaults, **generation_config.sampling_defaults()}
    if not defaults.get("do_sample"):
        defaults = {k: v for k, v in defaults.items() if k not in _SAMPLED_ONLY}
    if defaults.get("top_k") == 0:  # transformers' spelling of "off"
        defaults["top_k"] = None
    return defaults


def set_fields(sampling: SamplingParams | None) -> dict:
    """The fields `sampling` sets (those that differ from the defaults)."""
    if sampling is None:
        return {}
    if not isinstance(sampling, SamplingParams):
        SamplingParams.from_kwargs(sampling)  # the one error for a wrong type
    return {f.name: getattr(sampling, f.name) for f in dataclasses.fields(sampling)
            if getattr(sampling, f.name) != f.default}


def call_options(model, sampling: SamplingParams | None, options: dict,
                 generation_config: GenerationConfig | None = None) -> dict:
    """The options of one call: `model.generation_config`, then the fields `generation_config` sets,
    then what `sampling` sets, then keywords; each overrides the one before."""
    return {**config_defaults(model, generation_config), **set_fields(sampling), **options}


def resolve(model, sampling, options: dict, prompt_len: int,
            generation_config: GenerationConfig | None = None) -> tuple[SamplingParams, int]:
    """The params of this call and how many tokens it may add.

    Keywords override `sampling`, which overrides `generation_config`, which overrides
    `model.generation_config` (`call_options`). `max_length` (prompt + new) applies unless
    `max_new_tokens` is given too (as a keyword, in `sampling` or in a generation config), as in
    transformers.
    """
    merged = call_options(model, sampling, options, generation_config)
    params = SamplingParams.from_kwargs(None, also=GENERATE_OPTIONS, caller="generate", **merged)
    limit = params.max_new_tokens
    if params.max_length is not None and "max_new_tokens" not in merged:
        limit = params.max_length - prompt_len
        if limit < 1:
            raise ValueError(f"max_length={params.max_length} leaves no room after the {prompt_len}-token prompt; "
                             "raise max_length or pass max_new_tokens")
    return params, limit


def stop_string_hits(tokenizer, new_tokens: torch.Tensor, stops: tuple) -> torch.Tensor:
    """[B] bool: rows whose generated text now contains one of `stops` (decoded from the tail only:
    a row that matched earlier has already stopped)."""
    window = 4 * max(map(len, stops)) + 2  # a character is at most 4 byte-level tokens
    texts = [tokenizer.decode(row[-window:].tolist(), skip_special_tokens=False) for row in new_tokens]
    return torch.tensor([any(s in t for s in stops) for t in texts], device=new_tokens.device)


def refuse_right_padding(attention_mask: torch.Tensor) -> None:
    """A decoder continues each row from its last position, so padding must be on the left: a row whose
    mask ends in 0 (right padding) would silently continue from a padding token. One clear error."""
    rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
    if rows:
        raise KernelhubError(f"attention_mask row {rows[0]} ends in padding (right padding; {len(rows)} row(s) in "
                             "all): a decoder generates from each row's last position, so generate needs left "
                             "padding. Pad on the left: tokenizer.padding_side = 'left', or tokenizer(texts, "
                             "padding=True, padding_side='left', return_tensors='pt')")


@torch.inference_mode()
def generate(model, input_ids, *, sampling: SamplingParams | None = None, attention_mask=None, cache="dynamic",
             generator: torch.Generator | None = None, streamer=None, tokenizer=None,
             return_dict_in_generate: bool = False, output_scores: bool = False, compile: bool = False,
             generation_config=None, use_cache: bool | None = None, **options):
    """Extend `input_ids` [B, S] by up to `max_new_tokens` tokens; returns [B, S + new].

    `sampling` is a `SamplingParams`; `options` are its fields as keywords (`max_new_tokens`,
    `min_new_tokens`, `max_length`, `do_sample`, `temperature`, `top_k`, `top_p`,
    `repetition_penalty`, `eos_token_id` (int or list), `pad_token_id`, `stop_strings`, `seed`)
    and override it; unknown keywords are an error listing the valid ones (a close match first, then
    sorted). `generation_config` (a `GenerationConfig` or a dict of its fields) overrides
    `model.generation_config` field by field; `sampling` and keywords override it. `num_beams` other
    than 1 is refused: there is no beam search. Padded batches are left-padded with
    `attention_mask` (1 = token, 0 = padding); right padding is refused (a row would continue
    from a padding token). `use_cache=False` recomputes the whole sequence at every step, without a
    KV cache (the same tokens, slower). Rows that finished (an eos id,
    or one of `stop_strings`, which needs `tokenizer=`) are filled with `pad_token_id`
    (default: the first eos id). `streamer` gets `put(prompt)`, then `put(tokens)` per step and
    `end()` (transformers' `TextStreamer` works). `return_dict_in_generate=True` returns a
    `GenerateOutput` with `sequences` and, with `output_scores=True`, the processed scores.
    `compile=True` (with `cache="static"`) runs each decode step as one compiled graph, built once
    per cache-length bucket and batch-size bucket and reused across tokens and prompt lengths (see
    `kernelhub.runtime.compiled_decode`; a returned cache then holds the bucket's rows, the first
    B of them this call's); the prefill runs eagerly. The model keeps the last compiled call's
    cache for the next one of that shape, unless the call returns it.

    >>> model.generate(ids, max_new_tokens=20, eos_token_id=[2, 7], repetition_penalty=1.2)  # doctest: +SKIP
    >>> model.generate(ids, max_new_tokens=64, cache="static", compile=True)  # doctest: +SKIP
    """
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[-1] == 0:
        raise ValueError("input_ids is empty; generation needs at least one prompt token")
    batch, prompt_len = input_ids.shape
    refuse_beams(options.pop("num_beams", None))
    params, limit = resolve(model, sampling, options, prompt_len, as_generation_config(generation_config))
    if cache not in CACHE_KINDS:
        raise ValueError(f"unknown cache {cache!r}; valid: {', '.join(CACHE_KINDS)}")
    if compile not in (True, False):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    if use_cache not in (None, True, False):
        raise ValueError(f"use_cache must be True, False or None, got {use_cache!r}")
    use_cache = use_cache is not False
    if compile and cache != "static":
        raise ValueError(f"compile=True needs cache='static' (fixed shapes to compile once), got cache={cache!r}")
    if not use_cache and (compile or cache != "dynamic"):
        raise ValueError(f"use_cache=False recomputes every step without a cache; it cannot take cache={cache!r}"
                         f"{' and compile=True' if compile else ''}: drop those, or use_cache=True")
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer to read the text: pass tokenizer=...")
    device = next(model.parameters()).device
    generator = make_generator(params, device, generator)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else torch.as_tensor(attention_mask)
    if attention_mask.ndim == 1:
        attention_mask = attention_mask[None]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; input_ids has "
                         f"{tuple(input_ids.shape)}: they must match")
    attention_mask = attention_mask.to(device)
    refuse_right_padding(attention_mask)
    max_len = static_cache_length(prompt_len + limit) if compile else prompt_len + limit
    rows = batch_bucket(batch) if compile else batch  # the model runs `rows`; logits are kept for `batch`
    # a compiled call reuses the cache the model's last one left (the same addresses for CUDA graphs), unless
    # this call hands its cache to the caller
    reuse = compile and not return_dict_in_generate
    spec = (rows, max_len, frozenset((p.dtype, p.device) for p in model.parameters()))
    make = lambda: model.make_cache(cache, batch=rows, max_len=max_len)  # noqa: E731
    kv = kept_cache.take(model, "static", spec, make) if reuse else make() if use_cache else None
    check_cache_heads(model, kv)
    # compiled steps see the padding of the whole cache (ones past the prompt): one shape for every step
    padding = pad_rows(torch.nn.functional.pad(attention_mask, (0, max_len - prompt_len), value=1), rows) \
        if compile else None
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
    pad = params.pad_token_id if params.pad_token_id is not None else (int(eos[0]) if len(eos) else None)
    step_ids, sequences, scores = input_ids, input_ids, []
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    steps = compiled_steps(model, wants_cpp_wrapper(model, input_ids.device)) if compile else None
    for step in range(limit):
        ids_in, positions_in = pad_rows(step_ids, rows), pad_rows(positions, rows)
        if compile and step:
            logits = steps(ids_in, positions_in, padding, kv)[:batch]
        elif not use_cache:  # the whole sequence again, every step
            every = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            logits = model(sequences, attention_mask=attention_mask, position_ids=every, cache=None,
                           logits_to_keep=1).logits[:, -1]
        else:
            logits = model(ids_in, attention_mask=pad_rows(attention_mask, rows), position_ids=positions_in,
                           cache=kv, logits_to_keep=1).logits[:batch, -1]
        step_scores = warp(process_logits(logits, params, sequences, step), params)
        if output_scores:
            scores.append(step_scores)
        nxt = same_on_every_rank(model, pick(step_scores, params, generator))  # tensor parallel: rank 0's tokens
        if pad is not None:
            nxt = torch.where(unfinished, nxt, torch.full_like(nxt, pad))
        sequences = torch.cat([sequences, nxt[:, None]], dim=-1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        if len(eos):
            unfinished &= ~torch.isin(nxt, eos)
        if params.stop_strings:
            unfinished &= ~stop_string_hits(tokenizer, sequences[:, prompt_len:], params.stop_strings)
        if not bool(unfinished.any()):
            break
        step_ids = nxt[:, None]
        positions = positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
    if streamer is not None:
        streamer.end()
    if return_dict_in_generate:
        return GenerateOutput(sequences=sequences, scores=tuple(scores) if output_scores else None,
                              past_key_values=kv)
    if reuse:
        kept_cache.keep(model, "static", spec, kv)  # for the next call of this shape (a failed call drops it)
    return sequences
