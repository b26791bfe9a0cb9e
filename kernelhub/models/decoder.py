"""The steps of a causal decoder's forward that do not depend on the architecture.

A decoder file (models/llama.py, models/qwen3.py, ...) keeps its own math: embeddings, layers,
norms, the logits head. Around it, every decoder does the same bookkeeping, named as in
transformers' `*ForCausalLM.forward`: which cache to extend (`select_cache`), default positions
(`positions`), one causal mask per layer type (`layer_type_masks`), which outputs to capture
(`capture_outputs`), which positions get logits (`keep_logits`), and the returned
`CausalLMOutput` (`causal_lm_output`). The inner model these take is laid out as transformers'
`*Model`: `embed_tokens`, `layers[i].self_attn.attn` (an `AttentionSite`), `norm`.

>>> x = torch.zeros(1, 3, 8)  # the embeddings of three tokens
>>> masks = layer_type_masks(("sliding_attention", "full_attention", "sliding_attention"), 2, x, None, None)
>>> print(masks["sliding_attention"].to_ascii())  # each query sees itself and one token back
x..
xx.
.xx
>>> positions(x, None, None).tolist()
[[0, 1, 2]]
"""

from __future__ import annotations

import torch

from kernelhub.declare.attention_mask import AttentionMask
from kernelhub.declare.capture import capturing, require_weights
from kernelhub.declare.config_schema import invalid
from kernelhub.models.loss import causal_lm_loss
from kernelhub.models.outputs import CausalLMOutput, MoeCausalLMOutput


def select_cache(model, past_key_values, cache, use_cache):
    """The cache a forward extends: `past_key_values` or `cache` (two names for one argument), or a new
    `model.make_cache("dynamic")` when `use_cache` is true and neither is given.

    >>> from kernelhub.models.llama import LlamaForCausalLM
    >>> model = LlamaForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
    ...                           "num_hidden_layers": 1, "num_attention_heads": 2})
    >>> select_cache(model, None, None, use_cache=None) is None, type(select_cache(model, None, None, True)).__name__
    (True, 'DynamicCache')
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache as past_key_values or as cache, not both")
    cache = past_key_values if past_key_values is not None else cache
    if cache is None and use_cache:
        cache = model.make_cache("dynamic")
    return cache


def positions(x, cache, position_ids):
    """`position_ids`, or the positions that follow the cache's for the S tokens of `x` [B, S, H]."""
    if position_ids is not None:
        return position_ids
    past = cache.get_seq_length() if cache is not None else 0  # an int, or a compiled step's device tensor
    return (torch.arange(x.shape[1], device=x.device) + past).unsqueeze(0)


def layer_type_masks(layer_types, sliding_window, x, attention_mask, cache) -> dict:
    """One semantic causal `AttentionMask` per layer type for the tokens of `x` [B, S, H]; "sliding_attention"
    layers see `sliding_window` positions back. Masks are built per type, not per layer, sized from the
    cache of the first layer of each type. A paged cache has built its per-step `PagedMask`s already."""
    if getattr(cache, "paged", False):
        return cache.step_masks
    (batch, q_len), masks = x.shape[:2], {}
    for layer_type in dict.fromkeys(layer_types):
        idx = layer_types.index(layer_type)
        past = cache.get_seq_length(idx) if cache is not None else 0
        kv_len, kv_offset = cache.get_mask_sizes(q_len, idx) if cache is not None else (q_len, 0)
        masks[layer_type] = AttentionMask.build(
            batch=batch, q_len=q_len, kv_len=kv_len, q_offset=past, kv_offset=kv_offset, causal=True,
            sliding_window=sliding_window if layer_type == "sliding_attention" else None, padding=attention_mask,
            device=x.device)
    return masks


def capture_outputs(model, output_hidden_states, output_attentions):
    """A context collecting what the forward of the inner `model` was asked for: hidden states (the embeddings'
    and each layer's output) and attention weights (each layer's site; refused when a site is bound to a
    backend that returns none). See `kernelhub.declare.capture.capturing`."""
    if output_attentions:
        require_weights(model)
    points = lambda: {"hidden_states": [model.embed_tokens, *model.layers],  # noqa: E731
                      "attentions": [layer_.self_attn.attn for layer_ in model.layers]}
    return capturing(model, points, ["hidden_states" if output_hidden_states else None,
                                     "attentions" if output_attentions else None])


def keep_logits(hidden, logits_to_keep):
    """The hidden states [B, S, H] to project to logits: all (0), the last N, or the positions in a 1-D index
    tensor (packed batches: each sequence's last). Generation needs few, and the vocabulary projection is
    the largest matmul of the model.

    >>> keep_logits(torch.zeros(1, 5, 2), 2).shape, keep_logits(torch.zeros(1, 5, 2), torch.tensor([0, 3])).shape
    (torch.Size([1, 2, 2]), torch.Size([1, 2, 2]))
    """
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden[:, logits_to_keep]
    return hidden[:, -logits_to_keep:] if logits_to_keep else hidden


def causal_lm_output(logits, labels, cache, use_cache, captured) -> CausalLMOutput:
    """The `CausalLMOutput` of a forward: `loss` when there are `labels`, the cache unless `use_cache=False`,
    and the hidden states and attentions `captured` (`capture_outputs`) when asked for.

    >>> causal_lm_output(torch.zeros(1, 2, 4), torch.tensor([[1, 2]]), None, None, {}).loss
    tensor(1.3863)
    """
    hidden, attentions = captured.get("hidden_states"), captured.get("attentions")
    return CausalLMOutput(loss=causal_lm_loss(logits, labels) if labels is not None else None, logits=logits,
                          past_key_values=cache if use_cache is not False else None,
                          hidden_states=tuple(hidden) if hidden is not None else None,
                          attentions=tuple(attentions) if attentions is not None else None)


# -- mixture of experts: router logits and the load-balancing loss --------------------------------------

def router_options(d: dict, source: str) -> tuple[bool, float]:
    """(`output_router_logits`, `router_aux_loss_coef`) of an MoE config dict, defaults as transformers'
    (False, 0.001); null means the default."""
    wants = d.get("output_router_logits")
    if wants is not None and not isinstance(wants, bool):
        raise invalid(source, "output_router_logits", wants, "true, false or null")
    coef = d.get("router_aux_loss_coef")
    coef = 0.001 if coef is None else coef
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < float("inf"):
        raise invalid(source, "router_aux_loss_coef", coef, "a finite number >= 0")
    return bool(wants), float(coef)


def load_balancing_loss(router_logits, num_experts: int, top_k: int, attention_mask=None) -> torch.Tensor:
    """The auxiliary load-balancing loss of Switch Transformer (eq. 4-6), transformers'
    `load_balancing_loss_func` operation for operation: per layer, the share of top-k assignments and the
    mean router probability of each expert (padding rows left out when `attention_mask` [B, S] is given),
    summed over layers, normalised by all rows, dotted, times `num_experts`.

    >>> round(float(load_balancing_loss((torch.zeros(4, 2),), num_experts=2, top_k=1)), 4)  # balanced
    1.0
    """
    device = router_logits[0].device
    tokens = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0.0
    flat = attention_mask.reshape(-1).to(device=device, dtype=torch.float32) if attention_mask is not None else None
    for logits in router_logits:
        weights = torch.nn.functional.softmax(logits.to(device), dim=-1)
        _, chosen = torch.topk(weights, top_k, dim=-1)
        if flat is None:
            tokens = tokens + torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
            probs = probs + weights.float().sum(dim=0)
            rows = rows + weights.shape[0]
        else:
            tokens = tokens + torch.zeros(num_experts, dtype=torch.float32, device=device).scatter_add_(
                0, chosen.reshape(-1), flat.repeat_interleave(top_k))
            probs = probs + (weights.float() * flat.unsqueeze(-1)).sum(dim=0)
            rows = rows + flat.sum()
    return torch.sum((tokens / rows) * (probs / rows).unsqueeze(0)) * num_experts


def moe_causal_lm_output(out: CausalLMOutput, router_logits, *, num_experts: int, top_k: int, coef: float,
                         attention_mask=None) -> MoeCausalLMOutput:
    """`out` as a `MoeCausalLMOutput`; with `router_logits` (a list, one per sparse layer, when the forward
    was asked for them), also the `aux_loss`, added to the loss times `coef` when there is one, as in
    transformers. The mask's last S columns pair with the S tokens each layer routed (with a cache, the
    mask also covers the past)."""
    fields = {name: getattr(out, name) for name in out.keys()}
    if router_logits is None:
        return MoeCausalLMOutput(**fields)
    router_logits = tuple(router_logits)
    aux = None
    if router_logits:
        if attention_mask is not None:
            attention_mask = attention_mask[:, -(router_logits[0].shape[0] // attention_mask.shape[0]):]
        aux = load_balancing_loss(router_logits, num_experts, top_k, attention_mask)
        if fields.get("loss") is not None:
            fields["loss"] = fields["loss"] + coef * aux.to(fields["loss"].device)
    return MoeCausalLMOutput(**fields, aux_loss=aux, router_logits=router_logits)
