"""Hub kernels with transformers' GGUF kernel API, bound as the declared `QuantizedLinear` and
`QuantizedEmbedding` layers.

transformers calls a GGUF kernel repo through three functions (`ggml-org/ggml-quantization` and
`kernelhub/backends/gguf_quant.py` share them):

    mul_mat_vec(weight, x, ggml_type, out_features)      # [M, K] -> [M, out_features], M <= MAX_GEMV_ROWS
    dequantize(weight, ggml_type, rows, cols, dtype)      # [rows, bytes] uint8 -> [rows, cols]
    get_rows(weight, indices, ggml_type, cols, dtype)     # the rows `indices` names, unpacked

A repo whose module exposes them (and no `layers.<Name>` class) serves `QuantizedLinear` and
`QuantizedEmbedding` through the classes `ggml_layer` makes: stateless layer kernels reading the
host module's `qweight` and `ggml_type`. For `QuantizedLinear` (with `in_features`, `out_features`,
`bias`), up to `MAX_GEMV_ROWS` input rows (default 8) of a type in `GEMV_TYPES` (default: every type)
go to `mul_mat_vec`; more rows multiply by the weight unpacked with `dequantize`, a chunk of rows at
a time, in float32. For `QuantizedEmbedding` (with `embedding_dim`, `dtype_anchor`), `get_rows`
unpacks the rows a forward's ids name. The module may declare
`can_torch_compile` (default False, as `kernels` assumes for Hub layers), `devices` and `dtypes`.
Trust, the lock and the conformance probe (unpack to float32, then multiply) apply as to any layer
kernel; they run before this adapter is ever called.

>>> import types, torch
>>> from kernelhub.backends import gguf_quant
>>> impl, problems = ggml_layer(gguf_quant, "QuantizedLinear", "builtin gguf")
>>> impl.__name__, problems, impl.has_backward
('QuantizedLinear', [], False)
>>> ggml_layer(types.SimpleNamespace(), "QuantizedLinear", "x")[0] is None   # not this API
True
"""

from __future__ import annotations

import threading
import weakref

import torch

LAYER = "QuantizedLinear"
EMBEDDING = "QuantizedEmbedding"
API = ("mul_mat_vec", "dequantize", "get_rows")
MAX_GEMV_ROWS = 8  # transformers' default (its MMVQ_MAX_BATCH_SIZE)
CHUNK_VALUES = 1 << 22  # weight values `dequantize` unpacks at once for a prefill: 16 MB of float32

_lock = threading.Lock()
_adapters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {layer name: its class}


def exposes_ggml_api(module) -> bool:
    """Whether `module` has transformers' GGUF kernel functions (`mul_mat_vec`, `dequantize`, `get_rows`)."""
    return all(callable(getattr(module, name, None)) for name in API)


def _capabilities(module) -> dict:
    """The capability attributes the adapter class carries: kernels' defaults, then what the module declares."""
    attrs = {"has_backward": False, "can_torch_compile": bool(getattr(module, "can_torch_compile", False))}
    for name in ("devices", "dtypes"):
        if getattr(module, name, None) is not None:
            attrs[name] = getattr(module, name)  # contract_problems reports a malformed one
    return attrs


def _make_layer(module) -> type:
    mul_mat_vec, dequantize = module.mul_mat_vec, module.dequantize
    max_rows = int(getattr(module, "MAX_GEMV_ROWS", MAX_GEMV_ROWS))
    gemv_types = getattr(module, "GEMV_TYPES", None)
    gemv_types = None if gemv_types is None else frozenset(int(t) for t in gemv_types)

    def unpack_matmul(weight, flat, ggml_type: int, rows: int, cols: int):
        out = torch.empty(flat.shape[0], rows, dtype=torch.float32, device=flat.device)
        step = max(1, CHUNK_VALUES // cols)
        for start in range(0, rows, step):
            part = weight[start:start + step]
            values = dequantize(part, ggml_type, part.shape[0], cols, torch.float32)
            out[:, start:start + part.shape[0]] = flat @ values.to(flat.device).T
        return out

    def forward(self, x):
        flat = x.reshape(-1, self.in_features)
        ggml_type = self.ggml_type
        if flat.shape[0] <= max_rows and (gemv_types is None or ggml_type in gemv_types):
            out = mul_mat_vec(self.qweight, flat, ggml_type, self.out_features)
        else:
            out = unpack_matmul(self.qweight, flat.float(), ggml_type, self.out_features, self.in_features)
        bias = getattr(self, "bias", None)
        if bias is not None:
            out = out.float() + bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    name = getattr(module, "__name__", "kernel")
    namespace = {"forward": forward, "__module__": name, "__qualname__": LAYER,
                 "__doc__": f"QuantizedLinear through {name}'s transformers GGUF API (mul_mat_vec, dequantize)."}
    return type(LAYER, (torch.nn.Module,), {**namespace, **_capabilities(module)})


def _make_embedding(module) -> type:
    get_rows = module.get_rows

    def forward(self, input_ids):
        dtype = self.dtype_anchor.dtype
        rows = get_rows(self.qweight, input_ids.reshape(-1), self.ggml_type, self.embedding_dim, dtype)
        return rows.to(dtype).reshape(*input_ids.shape, self.embedding_dim)

    name = getattr(module, "__name__", "kernel")
    namespace = {"forward": forward, "__module__": name, "__qualname__": EMBEDDING,
                 "__doc__": f"QuantizedEmbedding through {name}'s transformers GGUF API (get_rows)."}
    return type(EMBEDDING, (torch.nn.Module,), {**namespace, **_capabilities(module)})


def ggml_layer(module, symbol: str, source: str) -> tuple[type | None, list[str]]:
    """(layer class or None, problems): the `QuantizedLinear` or `QuantizedEmbedding` kernel made from
    `module`'s transformers GGUF API. (None, []) when `module` does not expose that API; a problem when
    `symbol` names another layer. One class per module and layer, so conformance verdicts are cached
    per kernel."""
    if not exposes_ggml_api(module):
        return None, []
    makers = {LAYER: _make_layer, EMBEDDING: _make_embedding}
    if symbol not in makers:
        return None, [f"{source} exposes transformers' GGUF kernel API ({', '.join(API)}), which serves only the "
                      f"{LAYER} and {EMBEDDING} layers, not {symbol!r}; bind it as kernels={{{LAYER!r}: ...}}"]
    with _lock:
        made = _adapters.setdefault(module, {})
        if symbol not in made:
            made[symbol] = makers[symbol](module)
    return made[symbol], []


def ggml_conformance(module, types=(3, 12), device: str = "cpu") -> tuple[list[str], list[str]]:
    """(ok lines, problems) of the conformance probes a bind runs for `module`'s API as `QuantizedLinear`
    and `QuantizedEmbedding`, for ggml `types` (default Q4_1 and Q4_K) in float32 and each other dtype it
    declares: what `kernelhub kernel check` reports for such a repo."""
    from kernelhub.declare.reference_layers import QuantizedEmbedding, QuantizedLinear
    from kernelhub.registry.conformance import check_layer
    from kernelhub.registry.layer_contract import contract_problems

    lines, problems = [], []
    for symbol, reference, like_for in ((LAYER, QuantizedLinear, lambda t: QuantizedLinear(512, 48, t)),
                                        (EMBEDDING, QuantizedEmbedding, lambda t: QuantizedEmbedding(48, 512, t))):
        impl, found = ggml_layer(module, symbol, getattr(module, "__name__", "kernel"))
        if impl is None:
            return [], found or [f"exposes none of {', '.join(API)}"]
        found = contract_problems(impl, reference, hub=True)
        if found:
            problems += [f"{symbol}: {p}" for p in found]
            continue
        declared = getattr(impl, "dtypes", None) or (torch.float32, torch.bfloat16)
        for ggml_type in types:
            like = like_for(ggml_type)
            for dtype in [torch.float32, *(d for d in (torch.bfloat16, torch.float16) if d in declared)]:
                verdict = check_layer(impl.forward, like, dtype, torch.device(device))
                label = f"{symbol} ({like.kernel_plan_note()}, transformers' GGUF API)"
                if verdict.ok:
                    lines.append(f"{label}: conforms to kernelhub {symbol} in {str(dtype)[6:]} ({verdict.note()})")
                else:
                    problems.append(f"{label}: {verdict.reason()}")
    return lines, problems
