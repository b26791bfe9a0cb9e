"""Token generation: greedy or sampled, over a dynamic or static KV cache.

Works for any causal model whose forward is `forward(input_ids, attention_mask,
position_ids, cache, logits_to_keep) -> output with .logits` and which offers
`make_cache(kind, ...)`.

>>> from kernelhub.models.llama import LlamaForCausalLM
>>> cfg = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
...        "num_hidden_layers": 1, "num_attention_heads": 2}
>>> model = LlamaForCausalLM(cfg)
>>> generate(model, torch.tensor([[1, 2]]), max_new_tokens=3).shape
torch.Size([1, 5])
>>> generate(model, [1, 2], sampling=SamplingParams(max_new_tokens=2, do_sample=True, seed=0)).shape
torch.Size([1, 4])
"""

from __future__ import annotations

import torch

from kernelhub.models.sampling import SamplingParams, make_generator, sample

CACHE_KINDS = ("dynamic", "static")


@torch.inference_mode()
def generate(model, input_ids, *, sampling: SamplingParams | None = None, attention_mask=None, cache="dynamic",
             generator: torch.Generator | None = None, **options):
    """Extend `input_ids` [B, S] by up to `max_new_tokens` tokens; returns [B, S + new].

    `sampling` is a `SamplingParams`; `options` are its fields as keywords (`max_new_tokens`,
    `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`, `seed`) and override it.
    Padded batches are left-padded with `attention_mask` (1 = token, 0 = padding).
    Finished rows (after `eos_token_id`) keep emitting `eos_token_id`.
    """
    params = SamplingParams.from_kwargs(sampling, **options)
    if cache not in CACHE_KINDS:
        raise ValueError(f"unknown cache {cache!r}; valid: {', '.join(CACHE_KINDS)}")
    max_new_tokens, eos_token_id = params.max_new_tokens, params.eos_token_id
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[-1] == 0:
        raise ValueError("input_ids is empty; generation needs at least one prompt token")
    batch, prompt_len = input_ids.shape
    device = next(model.parameters()).device
    generator = make_generator(params, device, generator)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    kv = model.make_cache(cache, batch=batch, max_len=prompt_len + max_new_tokens)
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    step_ids, tokens = input_ids, [input_ids]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model(step_ids, attention_mask=attention_mask, position_ids=positions, cache=kv,
                       logits_to_keep=1).logits[:, -1]
        nxt = sample(logits, params, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        tokens.append(nxt[:, None])
        if eos_token_id is not None and bool(done.all()):
            break
        step_ids = nxt[:, None]
        positions = positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=-1)
    return torch.cat(tokens, dim=-1)
