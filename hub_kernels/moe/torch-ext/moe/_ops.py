"""Mixture-of-experts forward: routing in PyTorch, gather + grouped GEMM + scatter in Triton.

Weights follow the kernelhub `Experts` layout: `gate_up_proj` [E, 2I, H] (gate rows, then up
rows), `down_proj` [E, H, I], optional biases [E, 2I] and [E, H].

1. `align` sorts the T*K (token, slot) pairs by expert and pads each expert's run to a
   multiple of BLOCK_M (on the device, no host sync): every row block belongs to one expert.
2. `_gate_up`: per row block, gathers its tokens' hidden states, multiplies by the expert's
   gate and up rows, adds biases and applies the activation -> [T*K, I].
3. `_down`: per row block, multiplies by the expert's down projection, adds the bias and
   scales by the routing weight -> float32 [T*K, H], stored at each pair's slot.
4. `_combine`: each token sums its K slots -> [T, H] in the input dtype.

The Triton path is a `torch.library` custom op with a fake implementation, so a model using
it compiles whole. The op namespace is `moe_<hash of this file>`: two versions of the kernel
never share an op, and the same file imported twice registers once.
"""

import hashlib
import inspect
import os
import sys

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path below serves
    triton = None

ACTIVATIONS = {"silu": 0, "swiglu_clamped": 1}


def uses_triton(x: torch.Tensor) -> bool:
    """Triton on GPUs, and on CPU under the Triton interpreter; the reference otherwise."""
    if triton is None:
        return False
    return x.device.type in ("cuda", "xpu") or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _activation(gate_up, activation, alpha, limit):
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate) * up
    gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def reference_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias=None, down_bias=None,
                      activation="silu", alpha=1.702, limit=7.0):
    """The loop over experts that received tokens (the kernelhub `Experts` reference)."""
    out = torch.zeros_like(x)
    for expert in torch.unique(top_k_index).tolist():
        token, slot = torch.where(top_k_index == expert)
        h = F.linear(x[token], gate_up_proj[expert], None if gate_up_bias is None else gate_up_bias[expert])
        h = _activation(h, activation, alpha, limit)
        y = F.linear(h, down_proj[expert], None if down_bias is None else down_bias[expert])
        out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
    return out


def align(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """(slots, block_expert): the T*K slot ids sorted by expert, each expert's run padded with T*K
    to a multiple of `block_m`; the expert of each block (num_experts past the last one).

    >>> align(torch.tensor([[1, 0], [1, 2]]), 3, 2)[0].tolist()[:6]
    [1, 4, 0, 2, 3, 4]
    """
    flat = top_k_index.reshape(-1)
    slots_total = flat.numel()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat,
                                                                                          torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)
    start, padded_start = counts.cumsum(0) - counts, padded_end - padded
    experts = flat[order]
    rank = torch.arange(slots_total, device=flat.device) - start[experts]
    blocks = (slots_total + num_experts * (block_m - 1) + block_m - 1) // block_m  # an upper bound, no sync
    slots = torch.full((blocks * block_m,), slots_total, dtype=torch.int64, device=flat.device)
    slots[padded_start[experts] + rank] = order
    starts = torch.arange(blocks, device=flat.device) * block_m
    return slots, torch.searchsorted(padded_end, starts, right=True)


if triton is not None:

    @triton.jit
    def _gate_up(X, W, B, SLOTS, BLOCK_EXPERT, OUT, num_slots, num_experts, top_k, hidden, inter,
                 stride_x, stride_we, stride_wn, stride_be, stride_out, alpha, limit,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        expert = tl.load(BLOCK_EXPERT + tl.program_id(0)).to(tl.int64)
        if expert < num_experts:
            slots = tl.load(SLOTS + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
            valid = slots < num_slots
            tokens = slots // top_k
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < inter
            w = W + expert * stride_we
            gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, hidden, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < hidden
                a = tl.load(X + tokens[:, None] * stride_x + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
                w_mask = k_ok[:, None] & n_ok[None, :]
                wg = tl.load(w + n[None, :] * stride_wn + k[:, None], mask=w_mask, other=0.0)
                wu = tl.load(w + (n[None, :] + inter) * stride_wn + k[:, None], mask=w_mask, other=0.0)
                a = a.to(DOT)
                gate = tl.dot(a, wg.to(DOT), gate, input_precision=PRECISION)
                up = tl.dot(a, wu.to(DOT), up, input_precision=PRECISION)
            if HAS_BIAS:
                gate += tl.load(B + expert * stride_be + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                up += tl.load(B + expert * stride_be + inter + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            if ACT == 0:
                h = gate * tl.sigmoid(gate) * up
            else:
                gate = tl.minimum(gate, limit)
                up = tl.minimum(tl.maximum(up, -limit), limit)
                h = (up + 1) * (gate * tl.sigmoid(gate * alpha))
            tl.store(OUT + slots[:, None] * stride_out + n[None, :], h.to(OUT.dtype.element_ty),
                     mask=valid[:, None] & n_ok[None, :])

    @triton.jit
    def _down(H, W, B, SLOTS, BLOCK_EXPERT, ROUTE_W, OUT, num_slots, num_experts, hidden, inter,
              stride_h, stride_we, stride_wn, stride_be, stride_out,
              HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, DOT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        expert = tl.load(BLOCK_EXPERT + tl.program_id(0)).to(tl.int64)
        if expert < num_experts:
            slots = tl.load(SLOTS + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))
            valid = slots < num_slots
            n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = n < hidden
            w = W + expert * stride_we
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, inter, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                k_ok = k < inter
                a = tl.load(H + slots[:, None] * stride_h + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
                wd = tl.load(w + n[None, :] * stride_wn + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a.to(DOT), wd.to(DOT), acc, input_precision=PRECISION)
            if HAS_BIAS:
                acc += tl.load(B + expert * stride_be + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc *= tl.load(ROUTE_W + slots, mask=valid, other=0.0).to(tl.float32)[:, None]
            tl.store(OUT + slots[:, None] * stride_out + n[None, :], acc, mask=valid[:, None] & n_ok[None, :])

    @triton.jit
    def _combine(Y, OUT, top_k, hidden, BLOCK_N: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < hidden
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k in range(0, top_k):
            acc += tl.load(Y + (token * top_k + k) * hidden + n, mask=n_ok, other=0.0)
        tl.store(OUT + token * hidden + n, acc.to(OUT.dtype.element_ty), mask=n_ok)


def _block(size: int, most: int) -> int:
    return max(16, min(most, triton.next_power_of_2(size)))


def _triton_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
                    alpha, limit):
    tokens, top_k = top_k_index.shape
    num_experts, two_inter, hidden = gate_up_proj.shape
    inter, num_slots = two_inter // 2, tokens * top_k
    if num_slots == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    gate_up_proj, down_proj = gate_up_proj.contiguous(), down_proj.contiguous()
    # Each bias has its own flag: either may be None alone (a layer with only a gate/up bias, say).
    has_gate_up_bias, has_down_bias = gate_up_bias is not None, down_bias is not None
    gate_up_bias = gate_up_bias.contiguous() if has_gate_up_bias else gate_up_proj  # never read without HAS_BIAS
    down_bias = down_bias.contiguous() if has_down_bias else down_proj
    block_m = 16 if num_slots <= 64 * num_experts else 64
    slots, block_expert = align(top_k_index, num_experts, block_m)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # exact float32 products, as the reference
    # The interpreter multiplies 16-bit floats wrongly: on CPU the dots get float32 operands.
    dot = tl.float32 if x.device.type == "cpu" else {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(
        x.dtype, tl.float32)
    h = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    bn, bk = _block(inter, 64), _block(hidden, 64)
    grid = (block_expert.numel(), triton.cdiv(inter, bn))
    _gate_up[grid](x, gate_up_proj, gate_up_bias, slots, block_expert, h, num_slots, num_experts, top_k, hidden,
                   inter, x.stride(0), gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_bias.stride(0),
                   h.stride(0), float(alpha), float(limit), HAS_BIAS=has_gate_up_bias, ACT=ACTIVATIONS[activation],
                   PRECISION=precision, DOT=dot, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    y = torch.empty(num_slots, hidden, dtype=torch.float32, device=x.device)
    route_w = top_k_weights.reshape(-1).contiguous()
    bn, bk = _block(hidden, 64), _block(inter, 64)
    grid = (block_expert.numel(), triton.cdiv(hidden, bn))
    _down[grid](h, down_proj, down_bias, slots, block_expert, route_w, y, num_slots, num_experts, hidden, inter,
                h.stride(0), down_proj.stride(0), down_proj.stride(1), down_bias.stride(0), y.stride(0),
                HAS_BIAS=has_down_bias, PRECISION=precision, DOT=dot, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk)
    out = torch.empty_like(x)
    bn = _block(hidden, 256)
    _combine[(tokens, triton.cdiv(hidden, bn))](y, out, top_k, hidden, BLOCK_N=bn)
    return out


NAMESPACE = "moe_" + hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:16]


def _register():
    """Define the op once per namespace (a second import of the same bytes finds it)."""
    if hasattr(getattr(torch.ops, NAMESPACE), "experts"):
        return

    @torch.library.custom_op(f"{NAMESPACE}::experts", mutates_args=())
    def experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up_proj: torch.Tensor,
                down_proj: torch.Tensor, gate_up_bias: torch.Tensor | None, down_bias: torch.Tensor | None,
                activation: str, alpha: float, limit: float) -> torch.Tensor:
        """[T, H] combined expert outputs (forward only)."""
        return _triton_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias,
                               activation, alpha, limit)

    @experts.register_fake
    def _(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation, alpha, limit):
        return torch.empty_like(x)


if triton is not None:
    _register()


def moe_experts(x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias=None, down_bias=None,
                activation="silu", alpha=1.702, limit=7.0):
    """sum_k w[t, k] * expert_{idx[t, k]}(x[t]) for every token: [T, H] -> [T, H]. Forward only.

    `activation`: "silu" (silu(gate) * up) or "swiglu_clamped" (gpt-oss's clamped SwiGLU).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is unknown; valid: {', '.join(ACTIVATIONS)}")
    args = (x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up_bias, down_bias, activation,
            float(alpha), float(limit))
    if uses_triton(x):
        with torch.no_grad():  # forward only: the output carries no graph
            return getattr(torch.ops, NAMESPACE).experts(*args)
    return reference_experts(*args)
