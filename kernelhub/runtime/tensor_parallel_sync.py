"""Ranks in step: under tensor parallelism every rank runs the same generation loop and must take
the same decisions, or the collectives inside each forward would pair up wrongly.

`same_on_every_rank` gives every rank rank 0's sampled tokens (a broadcast through DTensor);
`agreed_min` makes the ranks agree on one number (the KV budget: free GPU memory differs per
rank); `check_cache_heads` refuses a preallocated cache sized for the config's kv heads rather
than this rank's. Each is a no-op for a model that is not tensor-parallel.
"""

from __future__ import annotations

import torch

from kernelhub.declare.errors import TensorParallelError


def same_on_every_rank(model, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as rank 0 of the model's mesh has it (a broadcast through DTensor); unchanged when the
    model is not tensor-parallel. Sampled tokens go through this, so ranks never diverge.

    >>> same_on_every_rank(torch.nn.Linear(2, 2), torch.tensor([3, 1]))  # not sharded: unchanged
    tensor([3, 1])
    """
    mesh = getattr(model, "device_mesh", None)
    if mesh is None:
        return tensor
    from torch.distributed.tensor import Replicate, distribute_tensor

    return distribute_tensor(tensor.contiguous(), mesh, [Replicate()], src_data_rank=0).to_local()


def check_cache_heads(model, cache) -> None:
    """A preallocated cache must hold this rank's kv heads; a model whose `make_cache` sizes it from
    the config's (global) count is refused clearly instead of failing inside a forward."""
    tp = getattr(model, "tensor_parallel", None)
    keys = getattr(cache, "keys", None)
    if tp is None or not tp.sites or not keys or not isinstance(keys[0], torch.Tensor):
        return
    _, kv_heads, _, local = next(iter(tp.sites.values()))
    if keys[0].shape[1] != local:
        raise TensorParallelError(f"{type(model).__name__}.make_cache sized this cache for {keys[0].shape[1]} kv "
                                  f"heads; under tensor parallelism this rank holds {local} of {kv_heads}. Use "
                                  "cache='dynamic' or generate_batch")


def agreed_min(model, value: int) -> int:
    """The smallest `value` over the ranks of the model's mesh (one all-reduce through DTensor).

    >>> agreed_min(torch.nn.Linear(2, 2), 1 << 30)  # not sharded: this process decides alone
    1073741824
    """
    mesh = getattr(model, "device_mesh", None)
    if mesh is None:
        return value
    from torch.distributed.tensor import DTensor, Partial

    local = torch.tensor([int(value)], dtype=torch.int64, device=next(model.parameters()).device)
    return int(DTensor.from_local(local, mesh, [Partial("min")], run_check=False).full_tensor()[0])
