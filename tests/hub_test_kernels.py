"""Kernel repos the Hub tests serve: our hub_kernels, plus broken ones for bad-input tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from kernelhub.kernel.build import build_kernel
from kernelhub.testing import write_kernel_repo

ORG = "kernelhub-test"
HUB_KERNELS = Path(__file__).resolve().parents[1] / "hub_kernels"
OURS = ("rmsnorm", "silu-and-mul", "layernorm", "rotary", "flash-attention", "moe", "gguf")


class RMSNorm(torch.nn.Module):  # the right name, with an extra forward argument
    def forward(self, x, residual):
        return x


class NotRMSNorm(torch.nn.Module):
    def forward(self, x):
        return x


def chunked_attention(module, q, k, v, mask, *, scaling, dropout=0.0, **kw):
    """Attention in two key chunks with an online softmax; mask is bool [B|1, 1, Q, KV]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(2, 3)).float() * scaling
    scores = scores.masked_fill(~mask, float("-inf"))
    half = scores.shape[-1] // 2 or 1
    m = torch.maximum(scores[..., :half].amax(-1, keepdim=True), scores[..., half:].amax(-1, keepdim=True))
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(scores - m)
    out = (p[..., :half] @ v[..., :half, :].float() + p[..., half:] @ v[..., half:, :].float())
    out = out / p.sum(-1, keepdim=True).clamp_min(1e-30)
    return out.to(q.dtype).transpose(1, 2), None


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **kw):
    """A test double of flash-attn's varlen API: per-sequence attention, bottom-right causal."""
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        if qe == qs:
            continue
        qi = q[qs:qe].transpose(0, 1).float()
        ki = k[ks:ke].repeat_interleave(groups, 1).transpose(0, 1).float()
        vi = v[ks:ke].repeat_interleave(groups, 1).transpose(0, 1).float()
        scores = qi @ ki.transpose(1, 2) * softmax_scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        rows = torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
        cols = torch.arange(ke - ks)[None, :]
        allowed = torch.ones(qe - qs, ke - ks, dtype=torch.bool)
        if causal:
            allowed &= cols <= rows
        if window_size[0] >= 0:
            allowed &= cols >= rows - window_size[0]
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[qs:qe] = (scores.softmax(-1) @ vi).transpose(0, 1).to(q.dtype)
    return out


COUNTED_RMSNORM = """
class RMSNorm(torch.nn.Module):
    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)
"""

ATTENTION_JSON = {"attention": {"chunked_attention": {
    "mask_format": "bool", "capabilities": {"devices": ["cpu"], "dtypes": ["float32", "bfloat16"]}}},
    "default_attention": "chunked_attention"}


def build_all(root: Path) -> dict[str, Path]:
    """repo name -> built repo directory, for every repo the loopback Hub serves."""
    repos = {}
    for name in OURS:
        repos[name] = shutil.copytree(HUB_KERNELS / name, root / name,
                                      ignore=shutil.ignore_patterns("build", "__pycache__"))
        build_kernel(repos[name])
    repos["import-error"] = write_kernel_repo(root / "import-error", "import-error", layers=[NotRMSNorm],
                                              init_source="raise ImportError('libmissing.so: cannot open')\n")
    repos["newer-kernels"] = write_kernel_repo(root / "newer-kernels", "newer-kernels", layers=[NotRMSNorm],
                                               kernels_minver="99.0.0")
    repos["cuda-only"] = write_kernel_repo(root / "cuda-only", "cuda-only", layers=[NotRMSNorm], backends=["cuda"])
    repos["missing-layer"] = write_kernel_repo(root / "missing-layer", "missing-layer", layers=[NotRMSNorm])
    repos["bad-signature"] = write_kernel_repo(root / "bad-signature", "bad-signature", layers=[RMSNorm])
    repos["attention"] = write_kernel_repo(root / "attention", "attention", functions=[chunked_attention],
                                           kernelhub_json=ATTENTION_JSON)
    repos["flash-double"] = write_kernel_repo(root / "flash-double", "flash-double",
                                              functions=[flash_attn_varlen_func])
    repos["counted"] = write_kernel_repo(
        root / "counted", "counted", layers=[COUNTED_RMSNORM],
        init_source="import builtins\nbuiltins.__dict__.setdefault('_kernelhub_counted_imports', []).append(1)\n")
    return repos
