"""The plugin module named by the entry point. Copy this file and replace the function.

`chunked_softmax_attention` computes exact attention over key blocks with an online
softmax (the FlashAttention recurrence) in plain torch, so peak memory grows with the block
size instead of with the key length. It takes the bool mask, and declares exactly what
it supports, so kernelhub refuses it with reasons where it cannot serve a site.
"""

import torch

import kernelhub

BLOCK = 64


def chunked_softmax_attention(module, q, k, v, mask, *, scaling, dropout=0.0):
    """q [B, H, Q, D], k/v [B, H_kv, KV, D], mask bool [B|1, 1, Q, KV] -> (out [B, Q, H, D], None)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    qf = q.float() * scaling
    running_max = torch.full(q.shape[:-1], float("-inf"), device=q.device)
    total = torch.zeros(q.shape[:-1], device=q.device)
    out = torch.zeros(q.shape, device=q.device)
    for start in range(0, k.shape[2], BLOCK):
        block = slice(start, start + BLOCK)
        scores = (qf @ k[:, :, block].float().transpose(-1, -2)).masked_fill(~mask[..., block], float("-inf"))
        new_max = torch.maximum(running_max, scores.amax(-1))
        safe_max = new_max.masked_fill(new_max == float("-inf"), 0.0)  # rows with nothing visible yet
        correction = torch.exp(running_max - safe_max)
        probs = torch.exp(scores - safe_max[..., None])
        total = total * correction + probs.sum(-1)
        out = out * correction[..., None] + probs @ v[:, :, block].float()
        running_max = new_max
    out = torch.where(total[..., None] > 0, out / total.clamp(min=1e-30)[..., None], 0.0)
    return out.to(q.dtype).transpose(1, 2), None


@kernelhub.hookimpl
def kernelhub_attention_backends():
    return [kernelhub.AttentionBackend(
        name="example_chunked",
        fn=chunked_softmax_attention,
        mask_format="bool",
        capabilities=kernelhub.Capabilities(dropout=False, softcap=False, returns_weights=False, backward=True),
        description="exact attention over 64-key blocks with an online softmax (plain torch)",
    )]
