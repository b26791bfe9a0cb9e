"""Token generation: greedy or sampled, over a dynamic or static KV cache.

Works for any causal model whose forward is `forward(input_ids, attention_mask,
position_ids, cache, logits_to_keep) -> output with .logits` and which offers
`make_cache(kind, ...)`.

>>> from kernelhub.models.llama import LlamaForCausalLM
>>> cfg = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
...        "num_hidden_layers": 1, "num_attention_heads": 2}
>>> generate(LlamaForCausalLM(cfg), torch.tensor([[1, 2]]), max_new_tokens=3).shape
torch.Size([1, 5])
"""

from __future__ import annotations

import torch

CACHE_KINDS = ("dynamic", "static")


def sample_next(logits, *, do_sample, temperature, top_k, top_p, generator):
    """Pick the next token from [B, V] logits."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model, input_ids, *, max_new_tokens=32, attention_mask=None, do_sample=False, temperature=1.0,
             top_k=None, top_p=None, eos_token_id=None, cache="dynamic", generator=None):
    """Extend `input_ids` [B, S] by up to `max_new_tokens` tokens; returns [B, S + new].

    Padded batches are left-padded with `attention_mask` (1 = token, 0 = padding).
    Finished rows (after `eos_token_id`) keep emitting `eos_token_id`.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if cache not in CACHE_KINDS:
        raise ValueError(f"unknown cache {cache!r}; valid: {', '.join(CACHE_KINDS)}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.shape[-1] == 0:
        raise ValueError("input_ids is empty; generation needs at least one prompt token")
    batch, prompt_len = input_ids.shape
    device = next(model.parameters()).device
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
        nxt = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
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
