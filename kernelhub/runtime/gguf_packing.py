"""Whether a GGUF load keeps its quantised weights packed, and the plan's word on it.

`from_pretrained(path.gguf)` keeps blocks packed (`kernelhub.checkpoint.gguf_packed`) where a packed
kernel serves the target device, for inference; `dequantize=True` asks for float weights, and
training, `tp_plan` or a device without a packed kernel dequantise on their own, with a plan note
saying why. `explain` takes the same decision from the file's tensor index alone, so its plan is the
one `from_pretrained` produces.

>>> packing("model.gguf", None, mode="training", tensor_parallel=False, device="cpu")[1]
"GGUF weights dequantised: mode='training' trains float weights (packed blocks have no gradient)..."
"""

from __future__ import annotations

from pathlib import Path

import torch

from kernelhub.declare.errors import KernelhubError, TensorParallelError
from kernelhub.registry.modes import parse_mode


def packing(path, dequantize: bool | None, *, mode, tensor_parallel: bool, device,
            kernels=None) -> tuple[Path | None, str | None]:
    """(the .gguf file to keep packed, or None; why a GGUF file is dequantised when `dequantize=None` chose it).

    A device no built-in packed kernel serves keeps the blocks packed all the same when `kernels`
    (the caller's `kernels=`) names a kernel for QuantizedLinear: that kernel (a Hub GPU build, say)
    is the one asked to serve them, and binding checks it as any other. A kernel named for
    QuantizedEmbedding alone is refused there: the packed Linears would have no kernel but the
    reference, which unpacks the whole weight at every call."""
    if dequantize not in (None, True, False):
        raise KernelhubError(f"dequantize={dequantize!r}; allowed: None (packed where a kernel serves), True, False")
    gguf = Path(path).suffix == ".gguf"
    if dequantize:
        return None, None
    if dequantize is False:
        if not gguf:
            raise KernelhubError(f"dequantize=False keeps a GGUF file's quantised weights packed; {str(path)!r} is "
                                 "not a .gguf file (drop the argument)")
        if tensor_parallel:
            raise TensorParallelError("dequantize=False does not combine with tp_plan: packed GGUF weights are not "
                                      "sharded; pass dequantize=True")
        return Path(path), None
    if not gguf:
        return None, None
    why = None
    kind = torch.device(device).type if device is not None else None
    if parse_mode(mode).training:
        why = f"mode={mode!r} trains float weights (packed blocks have no gradient)"
    elif tensor_parallel:
        why = "tp_plan shards float weights (packed blocks are not sharded)"
    elif kind not in packed_devices() and isinstance(kernels, dict) and "QuantizedLinear" not in kernels \
            and "QuantizedEmbedding" in kernels:
        raise KernelhubError(f"kernels names a QuantizedEmbedding kernel but none for QuantizedLinear: no built-in "
                             f"packed kernel serves device {kind!r} (they serve {', '.join(packed_devices())}), so "
                             "the packed Linears would unpack their whole weight at every call; name a kernel for "
                             "QuantizedLinear too, or pass dequantize=True (and drop the QuantizedEmbedding key)")
    elif kind not in packed_devices() and not names_packed_linear(kernels):
        why = (f"no packed GGUF kernel serves device {kind!r} (they serve {', '.join(packed_devices())}); "
               "dequantize=False keeps them packed on the reference layers")
    if why is not None:
        return None, f"GGUF weights dequantised: {why}; dequantize=True says so explicitly"
    return Path(path), None


def names_packed_linear(kernels) -> bool:
    """Whether a `kernels=` request names a kernel for QuantizedLinear."""
    return isinstance(kernels, dict) and "QuantizedLinear" in kernels


def packed_devices() -> tuple[str, ...]:
    """Where the built-in gguf kernels run (imported here, not at `import kernelhub`: registering their
    ops loads torch's compiler)."""
    from kernelhub.backends.gguf_linear import GgufLinear

    return GgufLinear.devices


def pack(model, gguf_file: Path, config: dict, *, read: bool = True):
    """Replace `model`'s (meta) layers that `gguf_file` keeps packed; return ({module path: blocks},
    plan notes). Binding gives the packed layers their `gguf` kernels unless `kernels=` names others
    (`kernelhub.registry.bind`)."""
    from kernelhub.checkpoint.gguf_packed import pack_model

    return pack_model(model, gguf_file, config, read=read)
