"""Loading a tensor-parallel model: the device mesh, then only this rank's slices of each weight.

`device_mesh_for` checks the process group and the devices before anything is read;
`read_local_state` reads, with safetensors `get_slice`, exactly the rows or columns this
rank holds (per packed part, per expert), never a whole sharded tensor. The mapping from
a model parameter to its checkpoint tensors comes from the model's own conversion
(`to_checkpoint`) applied to meta tensors and to small index probes, so fused q/k/v, gate/up,
per-expert files and transposed or interleaved layouts (gpt-oss's experts) are read the same
way: each slice passes through the model's `checkpoint_to_model`. A layout in which a rank's
rows are not one slice of the file is refused, naming the model and the tensor, before any
file is opened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kernelhub.declare.errors import CheckpointError, TensorParallelError
from kernelhub.checkpoint.hf_layout import from_checkpoint, ties, to_checkpoint, weight_files

TORCHRUN = ("run under torchrun (torchrun --nproc-per-node 2 your_script.py), or call "
            "torch.distributed.init_process_group() in every rank first")
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for env:// (and LOCAL_RANK)


def init_from_launcher(device=None) -> bool:
    """Initialise the default process group from a launcher's environment (torchrun: RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK), as transformers does for `tp_plan`: gloo for CPU ranks,
    nccl for CUDA ones (`device`'s type, else CUDA when available). False when no launcher started this
    process; a launcher's environment that lacks a variable is refused, naming it.

    >>> init_from_launcher()  # not under torchrun: nothing to initialise from
    False
    """
    import torch.distributed as dist

    present = [name for name in LAUNCHER_ENV if name in os.environ]
    if not present:
        return False
    missing = [name for name in LAUNCHER_ENV if name not in os.environ]
    if missing:
        raise TensorParallelError(f"tp_plan: the environment sets {', '.join(present)} but not {', '.join(missing)}; "
                                  f"{TORCHRUN}")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        values = ", ".join(f"{n}={os.environ.get(n)!r}" for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        raise TensorParallelError(f"tp_plan: the launcher's ranks are not integers ({values}); {TORCHRUN}") from None
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        torch.cuda.set_device(local_rank)  # NCCL needs this rank's GPU current before the group forms
    dist.init_process_group("nccl" if kind == "cuda" else "gloo", rank=rank, world_size=world)
    return True


def device_mesh_for(tp_size=None, device_mesh=None, device=None):
    """(1-D tensor-parallel DeviceMesh, this rank's device) for a `tp_plan` load.

    A process a launcher started (torchrun) without an initialised group gets one from the launcher's
    environment (`init_from_launcher`). Refused, before anything is read: no process group and no
    launcher, a `tp_size` other than the group's size, a mesh of several dimensions, a device of
    another type than the mesh's, ranks that ask for different device types or share one GPU.

    >>> device_mesh_for(tp_size=2)  # not under torchrun
    Traceback (most recent call last):
        ...
    kernelhub.declare.errors.TensorParallelError: tp_plan needs an initialised torch.distributed process group, ...
    """
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        init_from_launcher(device)  # under torchrun without init_process_group: as transformers does
    if not dist.is_available() or not dist.is_initialized():
        raise TensorParallelError(f"tp_plan needs an initialised torch.distributed process group, one process per "
                                  f"rank: {TORCHRUN}")
    if device_mesh is not None:
        if device_mesh.ndim != 1:
            names = device_mesh.mesh_dim_names or ()
            if "tp" not in names:
                raise TensorParallelError(f"device_mesh has {device_mesh.ndim} dimensions {names}; pass a 1-D mesh "
                                          "or one with a dimension named 'tp'")
            device_mesh = device_mesh["tp"]
        if tp_size is not None and tp_size != device_mesh.size():
            raise TensorParallelError(f"tp_size={tp_size} but device_mesh has {device_mesh.size()} ranks")
        mesh_type, owner = device_mesh.device_type, "device mesh"
    else:
        world = dist.get_world_size()
        if tp_size is not None and tp_size != world:
            raise TensorParallelError(f"tp_size={tp_size} but the process group has {world} ranks; start "
                                      f"{tp_size} processes, or pass device_mesh= (a 1-D mesh of {tp_size} ranks)")
        mesh_type, owner = ("cuda" if dist.get_backend() == "nccl" else None), "process group (nccl)"
    device = _rank_device(device, mesh_type, owner)
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available():
        torch.cuda.set_device(device)  # NCCL collectives run on the current device: make it this rank's
    _same_devices(device, device_mesh)
    if device_mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device_mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("tp",))
    return device_mesh, device


def _rank_device(device, mesh_type, owner: str) -> torch.device:
    if device is not None:
        device = torch.device(device)
        if mesh_type is not None and device.type != mesh_type:
            raise TensorParallelError(f"device {device} does not match the {owner}'s {mesh_type!r}: every rank "
                                      f"loads onto its own {mesh_type} device")
        if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # "cuda": this rank's GPU
        return device
    if mesh_type == "cuda":  # one GPU per rank, as torchrun numbers them
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")


def _same_devices(device: torch.device, mesh) -> None:
    """Every rank of the group asks for the same device type, and (NCCL) no two share one GPU (one collective)."""
    import torch.distributed as dist

    group = mesh.get_group() if mesh is not None else None
    devices = [None] * dist.get_world_size(group)
    dist.all_gather_object(devices, str(device), group=group)
    if len({torch.device(d).type for d in devices}) > 1:
        listed = ", ".join(f"rank {i} {d}" for i, d in enumerate(devices))
        raise TensorParallelError(f"ranks load onto mixed devices ({listed}); tensor parallelism needs one device "
                                  "type on every rank, one device per rank")
    indexed = [d for d in devices if ":" in d]
    if dist.get_backend(group) == "nccl" and len(set(indexed)) < len(indexed):
        raise TensorParallelError(f"ranks share a device ({', '.join(devices)}); give each rank its own "
                                  "(torchrun sets LOCAL_RANK; leave device unset)")


# -- slices ------------------------------------------------------------------------------------------------
# How a parameter is made from its checkpoint tensors is read off the model's own conversion
# (`to_checkpoint`), applied to meta tensors for shapes and to small index probes (global indices
# along one dim, the other dims cut to at most 2) for where each row or column lies in the file.


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to read one parameter: "concat" (file tensors concatenated along dim 0, one group),
    "stacked" (one group of such tensors per index of dim 0) or "converted" (one file tensor read
    as a slice along `file_dim` (`file_range`), then through the model's `checkpoint_to_model`)."""

    kind: str
    groups: tuple  # ((checkpoint name, shape), ...) per group
    file_dim: int | None = None
    file_range: tuple | None = None


def _refuse(model, key: str, why: str) -> TensorParallelError:
    return TensorParallelError(f"{type(model).__name__}: tensor parallelism cannot read {key} from its checkpoint "
                               f"tensors: {why}. Load it without tp_plan, or leave it out of the plan (replicated)")


def _probe(shape: tuple, dim: int, full: tuple = ()) -> torch.Tensor:
    """Global indices along `dim` (float64: exact), other dims cut to at most 2 except those in `full`."""
    small = [n if (j == dim or j in full) else min(n, 2) for j, n in enumerate(shape)]
    view = [n if j == dim else 1 for j, n in enumerate(small)]
    return torch.arange(shape[dim], dtype=torch.float64).view(view).expand(small).contiguous()


def _converted(model, key: str, tensors: dict):
    try:
        return to_checkpoint(model, tensors)
    except Exception as e:  # noqa: BLE001 - a conversion that cannot take a probe cannot be sliced either
        raise _refuse(model, key, f"the model's layout conversion fails on a slice ({type(e).__name__}: {e})") \
            from None


def _recipe(model, key: str, shape: tuple, shard, rank: int, world: int) -> Recipe:
    """The checkpoint tensors that make up `key` (global `shape`) and, when split, where this
    parameter's rows or columns lie in them. Every dim that is not concatenated must match exactly."""
    converted = _converted(model, key, {key: torch.empty(shape, device="meta")})
    items = tuple((name, tuple(t.shape)) for name, t in converted.items())
    dim = shard.dim if shard is not None and not shard.partial else None
    if len(items) == 1:
        return _single(model, key, shape, items, dim, shard.ranges(rank, world) if dim is not None else ())
    if all(len(s) == len(shape) and s[1:] == shape[1:] for _, s in items) and sum(s[0] for _, s in items) == shape[0]:
        _check_pieces(model, key, shape, (items,), 0, shard, rank, world)
        return Recipe("concat", (items,))
    if shape and all(len(s) == len(shape) - 1 and s[1:] == shape[2:] for _, s in items) and len(items) % shape[0] == 0:
        k = len(items) // shape[0]
        groups = tuple(items[i * k:(i + 1) * k] for i in range(shape[0]))
        if all(sum(s[0] for _, s in g) == shape[1] for g in groups):
            _check_pieces(model, key, shape, groups, 1, shard, rank, world)
            return Recipe("stacked", groups)
    raise _refuse(model, key, f"{shape} is not its checkpoint tensors "
                              f"{', '.join(f'{n} {s}' for n, s in items[:4])} concatenated or stacked along "
                              "dim 0 with every other dim equal")


def _check_pieces(model, key, shape, groups, axis: int, shard, rank: int, world: int) -> None:
    """The conversion must concatenate the pieces in order along `axis` (an index probe shows it), and
    this rank's ranges must not straddle two pieces."""
    full = (0,) if axis == 1 else ()
    probe = _probe(shape, axis, full)
    pieces = _converted(model, key, {key: probe})
    for i, group in enumerate(groups):
        want = probe[i] if axis == 1 else probe
        got = torch.cat([pieces[name] for name, _ in group], dim=0)
        if got.shape != want.shape or not torch.equal(got, want):
            raise _refuse(model, key, "its checkpoint tensors are not plain concatenated parts (the layout "
                                      "conversion reorders rows)")
    if shard is None or shard.dim != axis or shard.partial:
        return
    bounds, start = [], 0
    for _, s in groups[0]:
        bounds.append((start, start + s[0]))
        start += s[0]
    for a, b in shard.ranges(rank, world):
        if not any(lo <= a and b <= hi for lo, hi in bounds):
            raise _refuse(model, key, f"this rank's rows [{a}, {b}) straddle two checkpoint tensors")


def _single(model, key, shape, items, dim, ranges) -> Recipe:
    name, file_shape = items[0]
    back = from_checkpoint(model, {name: torch.empty(file_shape, device="meta")})
    if set(back) != {key} or tuple(back[key].shape) != shape:
        raise _refuse(model, key, f"the model's checkpoint_to_model does not turn {name} {file_shape} back into "
                                  f"{key} {shape}")
    if dim is None:
        return Recipe("converted", items)
    probe = _probe(shape, dim)
    filed = _converted(model, key, {key: probe})[name]
    varying = [f for f in range(filed.ndim) if filed.shape[f] > 1 and not torch.equal(
        filed, filed.narrow(f, 0, 1).expand_as(filed))]
    if len(varying) != 1:
        raise _refuse(model, key, f"dim {dim} of {key} is spread over dims {varying} of {name}")
    f = varying[0]
    index = filed.movedim(f, 0).reshape(filed.shape[f], -1)[:, 0].long()  # model index at each file position
    local = torch.cat([torch.arange(a, b) for a, b in ranges])
    where = torch.isin(index, local).nonzero().flatten()
    lo, hi = int(where.min()), int(where.max()) + 1
    if hi - lo != len(local):
        raise _refuse(model, key, f"this rank's {len(local)} entries of dim {dim} are not one contiguous range "
                                  f"of dim {f} of {name} {file_shape}")
    sliced = from_checkpoint(model, {name: filed.narrow(f, lo, hi - lo).contiguous()}).get(key)
    want = probe.index_select(dim, local)
    if sliced is None or sliced.shape != want.shape or not torch.equal(sliced, want):
        raise _refuse(model, key, f"the model's checkpoint_to_model does not give this rank's slice from rows "
                                  f"[{lo}, {hi}) of dim {f} of {name}")
    return Recipe("converted", items, f, (lo, hi))


def read_plan(model, tp) -> dict:
    """{parameter name: (Recipe, ParamShard | None)} for this rank, every parameter mapped and checked
    (dims, layout conversions, ranges) before any file is opened."""
    shards = {f"{mp}.{p.name}": p for mp, s in tp.modules.items() for p in s.params}
    tied = {alias for alias, _ in ties(model)}
    plan = {}
    for key, param in model.state_dict(keep_vars=True).items():
        if key in tied:
            continue  # a tied alias: read once, under its canonical name
        shard = shards.get(key)
        shape = shard.shape if shard is not None else tuple(param.shape)
        plan[key] = (_recipe(model, key, shape, shard, tp.rank, tp.world), shard)
    return plan


def _read_group(read, group, ranges, dim):
    """One group's tensor, of which only `ranges` along `dim` (of the group's frame) are read."""
    if dim is None:
        return torch.cat([read(name, ()) for name, _ in group], dim=0)
    if dim != 0:  # pieces stacked along 0, each sliced along dim
        return torch.cat([torch.cat([read(name, (slice(None),) * dim + (slice(a, b),)) for a, b in ranges], dim=dim)
                          for name, _ in group], dim=0)
    out, offsets, start = [], [], 0
    for name, shape in group:
        offsets.append((name, start, start + shape[0]))
        start += shape[0]
    for a, b in ranges:  # a range never straddles two pieces (`_check_pieces`)
        name, lo, _ = next(o for o in offsets if o[1] <= a < o[2])
        out.append(read(name, (slice(a - lo, b - lo),)))
    return torch.cat(out, dim=0)


def _read_one(model, key, recipe: Recipe, shard, read, tp):
    dim = shard.dim if shard is not None else None
    if recipe.kind == "converted":
        name = recipe.groups[0][0]
        if recipe.file_dim is None:
            tensor = read(name, ())
        else:
            lo, hi = recipe.file_range
            tensor = read(name, (slice(None),) * recipe.file_dim + (slice(lo, hi),))
        return from_checkpoint(model, {name: tensor})[key]
    ranges = shard.ranges(tp.rank, tp.world) if dim is not None else None
    if recipe.kind == "stacked":
        return torch.stack([_read_group(read, g, ranges, dim - 1 if dim is not None else None)
                            for g in recipe.groups])
    return _read_group(read, recipe.groups[0], ranges, dim)


def read_local_state(model, path, tp) -> dict:
    """{model parameter name: this rank's slice}, read with safetensors `get_slice`.

    Split parameters are read as their local rows/columns only; `partial` ones (a rowwise bias)
    by rank 0 only (zeros elsewhere); replicated ones whole. Every tensor passes through the
    model's own `checkpoint_to_model` (a transposed or interleaved file layout), on the slice."""
    plan = read_plan(model, tp)  # refusals come before any file is opened
    files = weight_files(Path(path))
    with contextlib.ExitStack() as stack:
        where = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(file, framework="pt"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read {file}: {e} (truncated or not a safetensors file?)") from None
            where.update({name: handle for name in handle.keys()})

        def read(name, index):
            piece = where[name].get_slice(name)
            return piece[index] if index else piece[:]

        state = {}
        for key, (recipe, shard) in plan.items():
            if shard is not None and shard.partial and tp.rank != 0:
                state[key] = torch.zeros(shard.shape)
            else:
                state[key] = _read_one(model, key, recipe, shard, read, tp)
    return state
