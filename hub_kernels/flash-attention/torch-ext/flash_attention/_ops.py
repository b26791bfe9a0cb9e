"""The Triton kernel: tiled attention with an online softmax (FlashAttention-2), one program
per (block of queries, sequence, head).

Keys are read either from packed sequences (`cu_seqlens_k`) or from a paged cache through a
block table, by the same kernel: only the row address of a key differs. Causal masks are
aligned bottom-right (the last query sees the last key), as flash-attn aligns them, so a
chunk of new queries over a longer cache needs no offsets.

Attention sinks (gpt-oss; `s_aux`, one logit per query head, the name vLLM's flash-attn and
transformers use) join each row's softmax denominator and add no value: the online softmax
starts from the sink (running max = sink, running sum = 1) instead of (-inf, 0).

The Triton launch is a `torch.library` custom op with a fake implementation (forward only),
namespaced `flash_attention_<hash of this file>`: two versions of the kernel never share an
op, and the same file imported twice (kernelhub ships it, a Hub repo serves it) registers once.
"""

import hashlib
import inspect
import os
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path below serves
    triton = None


def uses_triton(x: torch.Tensor) -> bool:
    """Triton on GPUs, and on CPU under the Triton interpreter; the reference otherwise."""
    if triton is None:
        return False
    return x.device.type in ("cuda", "xpu") or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _flash_forward(Q, K, V, O, CU_Q, CU_K, SEQ_K, BLOCK_TABLE, SINKS,  # noqa: E741 - the paper's Q, K, V in, O out
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                       stride_table, page_size, groups, head_dim, scale, softcap, window_left, window_right,
                       PAGED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
                       PRECISION: tl.constexpr, DOT: tl.constexpr,
                       BLOCK_M: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # One program: BLOCK_M rows = BLOCK_M // GROUP_PAD queries x every query head that shares
        # this kv head (grouped-query attention), so each key tile is loaded once for the group.
        block_m, seq, kv_head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        queries = BLOCK_M // GROUP_PAD
        q_start = tl.load(CU_Q + seq)
        q_len = tl.load(CU_Q + seq + 1) - q_start
        if block_m * queries < q_len:
            if PAGED:
                k_start = 0
                k_len = tl.load(SEQ_K + seq)
            else:
                k_start = tl.load(CU_K + seq)
                k_len = tl.load(CU_K + seq + 1) - k_start
            offs_r = tl.arange(0, BLOCK_M)
            q_idx = block_m * queries + offs_r // GROUP_PAD
            head = kv_head * groups + offs_r % GROUP_PAD
            in_row = (q_idx < q_len) & (offs_r % GROUP_PAD < groups)
            offs_d = tl.arange(0, BLOCK_D)
            in_d = offs_d < head_dim
            q_rows = (q_start + q_idx).to(tl.int64)
            q_offsets = q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
            q = tl.load(Q + q_offsets, mask=in_row[:, None] & in_d[None, :], other=0.0)
            # Query i sits at key position i + k_len - q_len (bottom-right alignment).
            shift = k_len - q_len
            q_pos = q_idx + shift
            # Only key blocks some query of this program can see.
            lo = k_len * 0  # a tensor in both branches, as Triton requires
            hi = k_len
            if window_right >= 0:
                hi = tl.minimum(k_len, block_m * queries + queries + shift + window_right)
            if window_left >= 0:
                lo = tl.maximum(0, block_m * queries + shift - window_left)
                lo = (lo // BLOCK_N) * BLOCK_N
            if HAS_SINKS:
                # The sink is a key every query sees, with logit s_aux[head] and a zero value: it
                # starts the running max and contributes exp(sink - max) = 1 to the running sum.
                m_i = tl.load(SINKS + head, mask=in_row, other=float("-inf")).to(tl.float32)
                l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
            else:
                m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            for start_n in range(lo, hi, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                in_n = offs_n < k_len
                if PAGED:
                    block = tl.load(BLOCK_TABLE + seq * stride_table + offs_n // page_size, mask=in_n, other=0)
                    k_rows = block.to(tl.int64) * page_size + offs_n % page_size
                else:
                    k_rows = (k_start + offs_n).to(tl.int64)
                kv_mask = in_n[:, None] & in_d[None, :]
                k = tl.load(K + k_rows[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                            mask=kv_mask, other=0.0)
                s = tl.dot(q.to(DOT), tl.trans(k.to(DOT)), input_precision=PRECISION) * scale
                if SOFTCAP:
                    # tanh(x) = 1 - 2 / (exp(2x) + 1), which stays finite for large |x|
                    s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
                allowed = in_n[None, :] & (q_idx[:, None] >= 0)  # [rows, keys] from the start, as Triton needs
                if window_right >= 0:
                    allowed = allowed & (offs_n[None, :] <= q_pos[:, None] + window_right)
                if window_left >= 0:
                    allowed = allowed & (offs_n[None, :] >= q_pos[:, None] - window_left)
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A row that has seen no key yet keeps m = -inf; subtract 0 instead (exp(-inf) = 0).
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(V + k_rows[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                            mask=kv_mask, other=0.0)
                # p is rounded to the input dtype first, as flash-attn does, whatever DOT is.
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(DOT), v.to(DOT), input_precision=PRECISION)
                m_i = m_new
            # Rows with no visible key (all masked) give zeros, as the eager reference does
            # (with sinks: acc is 0 and l_i is the sink's share).
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            o_offsets = q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
            tl.store(O + o_offsets, out.to(O.dtype.element_ty), mask=in_row[:, None] & in_d[None, :])


def _check(q, k, v, dropout_p, alibi_slopes, s_aux=None):
    if dropout_p:
        raise ValueError("this flash kernel is forward-only for inference: dropout_p must be 0")
    if alibi_slopes is not None:
        raise ValueError("this flash kernel has no ALiBi; alibi_slopes must be None")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one of float16, bfloat16, float32; "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of key/value heads ({k.shape[-2]})")
    if s_aux is not None and (tuple(s_aux.shape) != (q.shape[-2],) or s_aux.device != q.device):
        raise ValueError(f"s_aux (attention sinks) must be one logit per query head, shape ({q.shape[-2]},) on "
                         f"{q.device}; got {tuple(s_aux.shape)} on {s_aux.device}")


def _window(causal, window_size):
    left, right = window_size
    return left, 0 if causal else right


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, s_aux=None):
    """Attention over packed sequences: q [total_q, H, D], k/v [total_k, H_kv, D].

    With `block_table` ([B, max_blocks] int32), k/v are a paged cache
    [num_blocks, page_size, H_kv, D] and `cu_seqlens_k` gives each sequence's cached length.
    `s_aux` ([H]) adds attention sinks: one logit per query head in every row's denominator.

    >>> q = torch.randn(5, 2, 16)
    >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    >>> flash_attn_varlen_func(q, q, q, cu, cu, 3, 3, causal=True).shape
    torch.Size([5, 2, 16])
    """
    _check(q, k, v, dropout_p, alibi_slopes, s_aux)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    left, right = _window(causal, window_size)
    if block_table is not None:
        seq_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
        return _launch(q, k, v, cu_seqlens_q, None, seq_k, block_table, max_seqlen_q, scale, softcap, left, right,
                       s_aux)
    return _launch(q, k, v, cu_seqlens_q, cu_seqlens_k, None, None, max_seqlen_q, scale, softcap, left, right, s_aux)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, s_aux=None):
    """Attention over equal-length batches: q [B, S_q, H, D], k/v [B, S_k, H_kv, D] -> [B, S_q, H, D].

    >>> q = torch.randn(2, 3, 4, 16)
    >>> flash_attn_func(q, q, q, causal=True).shape
    torch.Size([2, 3, 4, 16])
    """
    b, s_q, h, d = q.shape
    s_k = k.shape[1]
    cu_q = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (b + 1) * s_k, s_k, dtype=torch.int32, device=q.device)
    out = flash_attn_varlen_func(q.reshape(b * s_q, h, d), k.reshape(b * s_k, -1, d), v.reshape(b * s_k, -1, d),
                                 cu_q, cu_k, s_q, s_k, dropout_p, softmax_scale, causal, window_size, softcap,
                                 alibi_slopes, s_aux=s_aux)
    return out.view(b, s_q, h, d)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            s_aux=None):
    """Decode-style attention of q [B, S_q, H, D] over a KV cache, appending k/v first if given.

    The cache is [B, S_max, H_kv, D], or paged [num_blocks, page_size, H_kv, D] with
    `block_table`; `cache_seqlens` [B] says how many positions each row holds (before k/v).

    >>> q = torch.randn(2, 1, 4, 16); cache = torch.randn(2, 8, 2, 16)
    >>> lens = torch.tensor([3, 8], dtype=torch.int32)
    >>> flash_attn_with_kvcache(q, cache, cache, cache_seqlens=lens, causal=True).shape
    torch.Size([2, 1, 4, 16])
    """
    if rotary_cos is not None or cache_batch_idx is not None or cache_leftpad is not None:
        raise ValueError("rotary_cos/sin, cache_batch_idx and cache_leftpad are not supported by this kernel")
    b, s_q, h, d = q.shape
    if block_table is None:  # a contiguous cache is a paged one with one page per row
        page_size, block_table = k_cache.shape[1], torch.arange(b, dtype=torch.int32, device=q.device)[:, None]
    else:
        page_size = k_cache.shape[1]
    if cache_seqlens is None:
        cache_seqlens = torch.full((b,), k_cache.shape[1], dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    lengths = cache_seqlens.to(torch.int32)
    if k is not None:
        positions = lengths[:, None] + torch.arange(k.shape[1], device=q.device)
        slots = block_table.gather(1, (positions // page_size).long()).long() * page_size + positions % page_size
        k_cache.view(-1, *k_cache.shape[2:])[slots.reshape(-1)] = k.reshape(-1, *k.shape[2:])
        v_cache.view(-1, *v_cache.shape[2:])[slots.reshape(-1)] = v.reshape(-1, *v.shape[2:])
        lengths = lengths + k.shape[1]
    cu_q = torch.arange(0, (b + 1) * s_q, s_q, dtype=torch.int32, device=q.device)
    cu_k = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    out = flash_attn_varlen_func(q.reshape(b * s_q, h, d), k_cache, v_cache, cu_q, cu_k, s_q,
                                 int(lengths.max()), 0.0, softmax_scale, causal, window_size, softcap,
                                 alibi_slopes, block_table=block_table.to(torch.int32), s_aux=s_aux)
    return out.view(b, s_q, h, d)


# Tile sizes on a GPU (prefill): queries per program (x the padded query group), keys per step.
GPU_TILE = {"queries": 16, "keys": 64, "warps": 4, "stages": 2}


NAMESPACE = "flash_attention_" + hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:16]


def _launch(q, k, v, cu_q, cu_k, seq_k, block_table, max_seqlen_q, scale, softcap, left, right, sinks=None):
    if not uses_triton(q):
        return reference_varlen_attention(q, k, v, cu_q, cu_k, seq_k, block_table, scale, softcap, left, right,
                                          sinks)
    return getattr(torch.ops, NAMESPACE).forward(q, k, v, cu_q, cu_k, seq_k, block_table, sinks, int(max_seqlen_q),
                                                 float(scale), float(softcap or 0.0), int(left), int(right))


def _register():
    """Define the op once per namespace (a second import of the same bytes finds it)."""
    if hasattr(getattr(torch.ops, NAMESPACE), "forward"):
        return

    @torch.library.custom_op(f"{NAMESPACE}::forward", mutates_args=())
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor | None,
                seq_k: torch.Tensor | None, block_table: torch.Tensor | None, sinks: torch.Tensor | None,
                max_seqlen_q: int, scale: float, softcap: float, left: int, right: int) -> torch.Tensor:
        """The Triton launch of `flash_attn_varlen_func` (arguments resolved)."""
        return _triton_forward(q, k, v, cu_q, cu_k, seq_k, block_table, max_seqlen_q, scale, softcap, left, right,
                               sinks)

    @forward.register_fake
    def _(q, k, v, cu_q, cu_k, seq_k, block_table, sinks, max_seqlen_q, scale, softcap, left, right):
        return torch.empty_like(q)


def _triton_forward(q, k, v, cu_q, cu_k, seq_k, block_table, max_seqlen_q, scale, softcap, left, right, sinks):
    total_q, heads, d = q.shape
    out = torch.empty_like(q)
    if total_q == 0:
        return out
    paged = block_table is not None
    batch = cu_q.numel() - 1
    groups = heads // k.shape[-2]
    group_pad = triton.next_power_of_2(groups)
    block_d = max(16, triton.next_power_of_2(d))
    # rows = queries x grouped heads; decode (one query) needs few rows, prefill many. The CPU
    # interpreter pays per program, not per element, so it gets fewer, larger tiles.
    if max_seqlen_q == 1:
        queries = 1
    else:
        queries = GPU_TILE["queries"] if q.is_cuda else min(64, triton.next_power_of_2(max_seqlen_q))
    block_m = max(16, group_pad * queries)
    block_n = GPU_TILE["keys"] if q.is_cuda else 128
    k_rows, v_rows = k.view(-1, *k.shape[-2:]), v.view(-1, *v.shape[-2:])  # paged: [blocks * page, H_kv, D]
    dummy = cu_q  # an unused pointer argument still needs a tensor
    # The interpreter multiplies 16-bit floats wrongly: on CPU the dots get float32 operands (p is
    # still rounded to the input dtype first). float32 inputs use IEEE products, never TF32.
    dot = tl.float32 if q.device.type == "cpu" else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(
        q.dtype, tl.float32)
    tiles = {"num_warps": GPU_TILE["warps"], "num_stages": GPU_TILE["stages"]} if q.is_cuda else {}
    grid = (triton.cdiv(max_seqlen_q, block_m // group_pad), batch, k.shape[-2])
    _flash_forward[grid](
        q, k_rows, v_rows, out, cu_q, cu_k if cu_k is not None else dummy, seq_k if paged else dummy,
        block_table if paged else dummy, sinks.contiguous() if sinks is not None else dummy,
        q.stride(0), q.stride(1), k_rows.stride(0), k_rows.stride(1), v_rows.stride(0), v_rows.stride(1),
        out.stride(0), out.stride(1), block_table.stride(0) if paged else 0, k.shape[1] if paged else 1,
        groups, d, scale, float(softcap or 0.0), left, right,
        PAGED=paged, SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DOT=dot,
        BLOCK_M=block_m, GROUP_PAD=group_pad, BLOCK_N=block_n, BLOCK_D=block_d, **tiles)
    return out


if triton is not None:
    _register()


def reference_varlen_attention(q, k, v, cu_q, cu_k, seq_k, block_table, scale, softcap=0.0, left=-1, right=-1,
                               sinks=None):
    """The same computation in PyTorch, one sequence at a time (float32 scores); `sinks` [H]
    are attention-sink logits, a softmax column that is dropped afterwards."""
    out = torch.zeros_like(q)
    groups = q.shape[1] // k.shape[-2]
    for i in range(cu_q.numel() - 1):
        qs, qe = int(cu_q[i]), int(cu_q[i + 1])
        if block_table is not None:
            k_len = int(seq_k[i])
            page = k.shape[1]
            rows = block_table[i, torch.arange(k_len) // page].long() * page + torch.arange(k_len) % page
            ki, vi = k.view(-1, *k.shape[2:])[rows], v.view(-1, *v.shape[2:])[rows]
        else:
            ki, vi = k[int(cu_k[i]):int(cu_k[i + 1])], v[int(cu_k[i]):int(cu_k[i + 1])]
            k_len = ki.shape[0]
        if qe == qs or k_len == 0:
            continue
        qi = q[qs:qe].transpose(0, 1).float()
        ki = ki.repeat_interleave(groups, 1).transpose(0, 1).float()
        vi = vi.repeat_interleave(groups, 1).transpose(0, 1).float()
        s = qi @ ki.transpose(1, 2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        q_pos = torch.arange(qe - qs)[:, None] + k_len - (qe - qs)
        cols = torch.arange(k_len)[None, :]
        allowed = torch.ones_like(s[0], dtype=torch.bool)
        if right >= 0:
            allowed &= cols <= q_pos + right
        if left >= 0:
            allowed &= cols >= q_pos - left
        s = s.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sink = sinks.float().view(-1, 1, 1).expand(-1, s.shape[1], 1)
            p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1].nan_to_num(0.0)
        else:
            p = torch.softmax(s, -1).nan_to_num(0.0)
        out[qs:qe] = (p @ vi).transpose(0, 1).to(q.dtype)
    return out


__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "reference_varlen_attention",
           "uses_triton"]
