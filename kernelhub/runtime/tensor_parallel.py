"""Tensor parallelism: a model file's `tp_plan`, applied on torch.distributed.

A decoder model declares, as a class attribute, which modules are split across the ranks
of a tensor-parallel group, and how (module-path globs, `*` standing for one path part):

    tp_plan = {"model.embed_tokens": "vocab_embedding",
               "model.layers.*.self_attn.qkv_proj": "packed_colwise",   # q, k, v split per head group
               "model.layers.*.self_attn.o_proj": "rowwise",
               "model.layers.*.mlp.gate_up_proj": "packed_colwise",      # gate and up split per half
               "model.layers.*.mlp.down_proj": "rowwise",
               "model.norm": "replicated", "lm_head": "colwise_gather"}

Every rank holds plain local shards: a sharded module is an ordinary module of local
shape, so attention sites see local head counts and layer kernels bind and run on local
tensors. Layouts change only at module boundaries, through DTensor: the styles below are
`torch.distributed.tensor.parallel` `ParallelStyle`s applied with `parallelize_module`, and a
rowwise output is a `Partial` DTensor redistributed to `Replicate` (all-reduce), lm_head's
logits go from `Shard(-1)` to `Replicate` (all-gather). No communication is written by hand.
`tensor_parallel_load` reads each rank's slices of the checkpoint; `tensor_parallel_sync` keeps
the ranks' generation loops in step.

>>> from kernelhub.models.llama import LlamaForCausalLM
>>> cfg = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
...        "num_attention_heads": 4, "num_key_value_heads": 2}
>>> with torch.device("meta"):
...     model = LlamaForCausalLM(cfg)
>>> tp = shard_model(model, plan_shards(model, "auto", world=2), rank=1)
>>> attn = model.model.layers[0].self_attn
>>> tuple(attn.qkv_proj.weight.shape), attn.attn.num_heads, attn.attn.num_kv_heads, attn.qkv_sizes
((16, 16), 2, 1, (8, 4, 4))
>>> tp.describe("model.layers.0.self_attn.qkv_proj")
'packed_colwise: weight (32, 16) -> (16, 16), parts 16+8+8 split on dim 0 (rank 1 of 2)'
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import math
import threading

import torch
from torch import nn

from kernelhub.declare.errors import TensorParallelError, suggestion
from kernelhub.declare.site import AttentionSite

STYLES = {
    "colwise": "output features split; the output stays split for the rowwise module after it",
    "packed_colwise": "colwise for a fused projection: each packed part (q/k/v, gate/up) split on its own",
    "rowwise": "input features split; the ranks' partial outputs are summed (all-reduce); a bias is added once",
    "vocab_embedding": "vocabulary rows split; ids outside a rank's rows look up zeros; partial sums all-reduced",
    "colwise_gather": "colwise with the outputs gathered: every rank gets all logits",
    "experts": "tensor-parallel MoE experts: gate/up split per half and down along the intermediate size; "
               "outputs all-reduced",
    "heads": "an attention module's own 1-D per-head parameters (gpt-oss's sinks) split by head, with the q heads",
    "replicated": "every rank holds the whole module",
}
ALIASES = {"colwise_gather_output": "colwise_gather", "colwise_rep": "colwise_gather",
           "embedding_rowwise": "vocab_embedding", "moe_tp_experts": "experts"}
SPLITS_HEADS = ("colwise", "packed_colwise")  # a site under a module split like this has local heads


@dataclasses.dataclass(frozen=True)
class ParamShard:
    """How one parameter is split: along `dim` (None: whole on every rank), each packed part
    (`parts`, global sizes along `dim`) on its own; `partial` parameters (a rowwise bias) are
    held by rank 0 and zero elsewhere, so the all-reduce adds them once."""

    name: str
    shape: tuple
    dim: int | None = None
    parts: tuple = ()
    partial: bool = False

    def local_shape(self, world: int) -> tuple:
        if self.dim is None:
            return self.shape
        shape = list(self.shape)
        shape[self.dim] = sum(p // world for p in self.parts)
        return tuple(shape)

    def ranges(self, rank: int, world: int) -> list[tuple[int, int]]:
        """This rank's [start, stop) along `dim` of the global tensor, one range per part."""
        out, offset = [], 0
        for part in self.parts:
            n = part // world
            out.append((offset + rank * n, offset + (rank + 1) * n))
            offset += part
        return out


@dataclasses.dataclass(frozen=True)
class ModuleShard:
    """One module's style and its parameters' shards."""

    style: str
    params: tuple  # (ParamShard, ...)

    def describe(self, rank: int, world: int) -> str:
        split = [p for p in self.params if p.dim is not None]
        if not split:
            what = "whole on every rank" if self.style == "replicated" else \
                ", ".join(f"{p.name} added once (rank 0)" for p in self.params if p.partial) or "whole"
            return f"{self.style}: {what}"
        text = ", ".join(f"{p.name} {p.shape} -> {p.local_shape(world)}" for p in split)
        main = split[0]
        parts = f"parts {'+'.join(map(str, main.parts))} split" if len(main.parts) > 1 else "split"
        once = "".join(f", {p.name} added once (rank 0)" for p in self.params if p.partial)
        return f"{self.style}: {text}, {parts} on dim {main.dim}{once} (rank {rank} of {world})"

    def to_dict(self, rank: int, world: int) -> dict:
        return {"style": self.style, "params": {p.name: {
            "shape": list(p.shape), "local_shape": list(p.local_shape(world)), "dim": p.dim,
            "ranges": [list(r) for r in p.ranges(rank, world)] if p.dim is not None else None,
            "partial": p.partial} for p in self.params}}


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """What a model's tensor-parallel load did on this rank (`model.tensor_parallel`)."""

    rank: int
    world: int
    plan: dict              # glob -> style, as applied
    modules: dict           # module path -> ModuleShard
    sites: dict             # attention site path -> (heads, kv heads, local heads, local kv heads)

    def describe(self, path: str) -> str:
        """The sharding of the module at `path`, in words ('' when it is not sharded)."""
        if path in self.sites:
            h, kv, lh, lkv = self.sites[path]
            return f"heads {h} -> {lh}, kv heads {kv} -> {lkv} (rank {self.rank} of {self.world})"
        shard = self.modules.get(path)
        return shard.describe(self.rank, self.world) if shard is not None else ""

    def to_dict(self) -> dict:
        return {"tp_size": self.world, "rank": self.rank, "plan": dict(self.plan),
                "modules": {p: {**s.to_dict(self.rank, self.world), "description": s.describe(self.rank, self.world)}
                            for p, s in self.modules.items()},
                "attention": {p: dict(zip(("heads", "kv_heads", "local_heads", "local_kv_heads"), v))
                              for p, v in self.sites.items()}}


# -- planning: every check before anything changes ------------------------------------------------------

def glob_match(glob: str, path: str) -> bool:
    """`*` stands for one dotted part, as in `parallelize_module`.

    >>> glob_match("model.layers.*.mlp", "model.layers.3.mlp"), glob_match("model.*", "model.layers.3")
    (True, False)
    """
    parts, globs = path.split("."), glob.split(".")
    return len(parts) == len(globs) and all(fnmatch.fnmatchcase(p, g) for p, g in zip(parts, globs))


def resolve_plan(model, tp_plan) -> dict:
    """`"auto"` -> the model class's `tp_plan`; a dict is used as given (styles normalised)."""
    if tp_plan == "auto":
        declared = getattr(type(model), "tp_plan", None)
        if not declared:
            raise TensorParallelError(f"{type(model).__name__} declares no tp_plan, so tp_plan='auto' has nothing "
                                      "to apply; pass a plan dict {module glob: style} or load without tp_plan")
        tp_plan = declared
    if not isinstance(tp_plan, dict) or not tp_plan:
        raise TensorParallelError(f"tp_plan={tp_plan!r} is not a plan; pass 'auto' (the model's own) or a dict "
                                  f"{{module glob: style}} with styles {', '.join(STYLES)}")
    plan = {}
    for key, style in tp_plan.items():
        name = ALIASES.get(style, style)
        if name not in STYLES:
            raise TensorParallelError(f"tp_plan[{key!r}] = {style!r} is not a style.{suggestion(str(style), STYLES)} "
                                      f"Valid: {', '.join(STYLES)} (transformers spellings: {', '.join(ALIASES)})")
        plan[key] = name
    return plan


def _fused_parts(model, path: str):
    """(part sizes) when `path` is a projection the model fuses from several checkpoint tensors."""
    for suffix in getattr(model, "FUSED", {}):
        if path.endswith("." + suffix):
            return tuple(model.fused_sizes()[suffix])
    return None


def _param_shards(model, path: str, module, style: str) -> tuple:
    fused = _fused_parts(model, path)
    if style in ("colwise", "colwise_gather", "rowwise") and fused is not None:
        raise TensorParallelError(f"{path} fuses {len(fused)} projections ({'+'.join(map(str, fused))} rows); "
                                  f"'{style}' would split the fused rows as one block: use 'packed_colwise'")
    shards = []
    for name, p in module.named_parameters(recurse=False):
        shape, dim, parts, partial = tuple(p.shape), None, (), False
        if style == "replicated":
            pass
        elif style == "heads":
            dim = 0
        elif style == "experts":
            if name.startswith("gate_up_proj"):  # [E, 2I, H] / bias [E, 2I]: gate half, up half
                dim = 1
                parts = (shape[1] // 2, shape[1] - shape[1] // 2)
            elif name == "down_proj":  # [E, H, I]
                dim = 2
            else:
                partial = True  # down_proj_bias: added once
        elif style == "rowwise":
            dim, partial = (1, False) if name == "weight" else (None, True)
        else:  # colwise kinds and the vocabulary embedding: output rows (and their bias)
            dim = 0
            if style == "packed_colwise":
                parts = fused or (shape[0] // 2, shape[0] - shape[0] // 2)
        if dim is not None and not parts:
            parts = (shape[dim],)
        shards.append(ParamShard(name, shape, dim, tuple(parts), partial))
    return tuple(shards)


def _check_module(path: str, module, style: str) -> None:
    need = {"vocab_embedding": nn.Embedding}.get(style)
    if need is not None and not isinstance(module, need):
        raise TensorParallelError(f"tp_plan style '{style}' needs an nn.Embedding; {path} is a "
                                  f"{type(module).__name__}")
    if style == "experts" and not all(isinstance(getattr(module, n, None), torch.Tensor)
                                      for n in ("gate_up_proj", "down_proj")):
        raise TensorParallelError(f"tp_plan style 'experts' needs an Experts layer (gate_up_proj, down_proj); "
                                  f"{path} is a {type(module).__name__}")
    if style == "heads":
        sites = [m for m in module.children() if isinstance(m, AttentionSite)]
        params = dict(module.named_parameters(recurse=False))
        bad = [f"{n} {tuple(p.shape)}" for n, p in params.items() if not sites or p.shape != (sites[0].num_heads,)]
        if not sites or not params or bad:
            heads = f"{sites[0].num_heads} " if sites else ""
            raise TensorParallelError(f"tp_plan style 'heads' splits an attention module's own 1-D parameters of "
                                      f"one entry per q head ({heads}heads); {path} ({type(module).__name__}) has "
                                      f"{'no attention site' if not sites else ', '.join(bad) or 'no parameters'}")
    if style in ("colwise", "packed_colwise", "colwise_gather", "rowwise"):
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Embedding):
            raise TensorParallelError(f"tp_plan style '{style}' splits a linear layer; {path} is an embedding: "
                                      "use 'vocab_embedding'")
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
            raise TensorParallelError(f"tp_plan style '{style}' splits a linear layer's 2-D weight; {path} is a "
                                      f"{type(module).__name__}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def plan_shards(model, tp_plan, *, world: int) -> dict:
    """{module path: ModuleShard} for `world` ranks, every size checked; nothing is changed.

    Errors name the numbers: a plan key matching no module, heads, kv heads or another size
    that `world` does not divide (with the sizes that would), a world larger than the kv heads.
    A key of the model's own plan ("auto") may match nothing: a MoE model whose every layer is
    sparse has no dense MLP.
    """
    declared = tp_plan == "auto"
    plan = resolve_plan(model, tp_plan)
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise TensorParallelError(f"tp_size must be a positive int, got {world!r}")
    modules = dict(model.named_modules())
    shards = {}
    for key, style in plan.items():
        matched = [p for p in modules if p and glob_match(key, p)]
        if not matched and not declared:
            near = difflib.get_close_matches(key.replace("*", "0"), [p for p in modules if p], n=3, cutoff=0)
            raise TensorParallelError(f"tp_plan key {key!r} matches no module of {type(model).__name__}; keys are "
                                      f"module paths where '*' stands for one part; closest: "
                                      f"{', '.join(repr(e) for e in near)}")
        for path in matched:
            if path in shards:
                raise TensorParallelError(f"{path} is matched by two tp_plan keys; give each module one style")
            _check_module(path, modules[path], style)
            shards[path] = ModuleShard(style, _param_shards(model, path, modules[path], style))
    sites = _split_sites(model, shards)
    _check_sizes(model, shards, sites, world)
    return {"plan": plan, "modules": shards, "world": world, "split_sites": tuple(sites)}


def _split_sites(model, shards: dict) -> dict:
    """Attention sites whose module's projections are split: they hold local heads."""
    out = {}
    for path, site in model.named_modules():
        if isinstance(site, AttentionSite):
            parent = path.rpartition(".")[0]
            if any(p.startswith(parent + ".") and s.style in SPLITS_HEADS for p, s in shards.items()):
                out[path] = site
    return out


def _check_sizes(model, shards: dict, sites: dict, world: int) -> None:
    cfg = getattr(model, "config", None)
    sizes = [p for s in shards.values() for ps in s.params for p in ps.parts]
    sizes += [n for site in sites.values() for n in (site.num_heads, site.num_kv_heads)]
    hint = f"tp sizes that divide every split size of this model: {_divisors(math.gcd(*sizes))}" if sizes else ""
    for path, site in sites.items():
        if site.num_kv_heads < world:
            raise TensorParallelError(f"tp_size={world} is larger than num_key_value_heads={site.num_kv_heads} "
                                      f"({path}): every rank needs at least one kv head; {hint}")
        for what, n in (("num_attention_heads", site.num_heads), ("num_key_value_heads", site.num_kv_heads)):
            if n % world:
                raise TensorParallelError(f"{what}={n} is not divisible by tp_size={world} ({path}); {hint}")
    vocab = getattr(cfg, "vocab_size", None)
    if vocab and vocab % world and any(s.style in ("vocab_embedding", "colwise_gather") for s in shards.values()):
        raise TensorParallelError(f"vocab_size={vocab} is not divisible by tp_size={world}; {hint}")
    for path, shard in shards.items():
        for p in shard.params:
            bad = [n for n in p.parts if n % world]
            if bad:
                fields = [f for f in ("intermediate_size", "moe_intermediate_size", "hidden_size")
                          if getattr(cfg, f, None) == bad[0]]
                named = f" ({'/'.join(fields)})" if fields else ""
                raise TensorParallelError(f"{path}.{p.name}: size {bad[0]}{named} along dim {p.dim} is not "
                                          f"divisible by tp_size={world} ({shard.style}); {hint}")


# -- applying: local shapes on the meta model --------------------------------------------------------------

def shard_model(model, planned: dict, *, rank: int) -> TensorParallel:
    """Give every planned parameter its local shape (the model is on the meta device), attention
    sites their local head counts, and record it all as `model.tensor_parallel`."""
    world, shards = planned["world"], planned["modules"]
    replaced: dict = {}  # id(global parameter) -> local one: tied weights stay tied
    for path, shard in shards.items():
        module = model.get_submodule(path)
        for p in shard.params:
            old = getattr(module, p.name)
            if id(old) not in replaced:
                replaced[id(old)] = nn.Parameter(torch.empty(p.local_shape(world), dtype=old.dtype,
                                                             device=old.device), requires_grad=old.requires_grad)
            setattr(module, p.name, replaced[id(old)])
        _local_sizes(module, shard, world)
    sites = {}
    for path in planned["split_sites"]:
        site = model.get_submodule(path)
        sites[path] = (site.num_heads, site.num_kv_heads, site.num_heads // world, site.num_kv_heads // world)
        site.num_heads, site.num_kv_heads = site.num_heads // world, site.num_kv_heads // world
        parent = model.get_submodule(path.rpartition(".")[0])
        if isinstance(getattr(parent, "qkv_sizes", None), tuple):  # the model files' name for the q/k/v split
            parent.qkv_sizes = tuple(n // world for n in parent.qkv_sizes)
    tp = TensorParallel(rank, world, planned["plan"], shards, sites)
    model.tensor_parallel, model.tp_size = tp, world
    return tp


def _local_sizes(module, shard: ModuleShard, world: int) -> None:
    """Size attributes kernels read describe the local shard (an embedding keeps its vocabulary size)."""
    weight = next((p for p in shard.params if p.name == "weight"), None)
    if isinstance(module, nn.Linear) and weight is not None:
        module.out_features, module.in_features = weight.local_shape(world)
    if shard.style == "experts" and hasattr(module, "intermediate_size"):
        module.intermediate_size //= world


# -- layouts at module boundaries, through DTensor ---------------------------------------------------------

def boundary_style(style: str, rank: int, world: int):
    """The `ParallelStyle` that changes layouts around a module of `style` (None: nothing to do)."""
    from torch.distributed.tensor import Partial, Replicate, Shard
    from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleOutput

    class VocabEmbedding(ParallelStyle):
        """Ids outside this rank's rows look up row 0 and are zeroed after; partial sums all-reduced."""

        def _apply(self, module, mesh):
            rows, outside = module.weight.shape[0], threading.local()

            def local_ids(_, args):
                ids = args[0] - rank * rows
                outside.mask = (ids < 0) | (ids >= rows)
                return (ids.masked_fill(outside.mask, 0),) + tuple(args[1:])

            def zero_outside(_, args, out):
                return out.masked_fill(outside.mask.unsqueeze(-1), 0)

            module.register_forward_pre_hook(local_ids)
            module.register_forward_hook(zero_outside)
            return PrepareModuleOutput(output_layouts=Partial(),
                                       desired_output_layouts=Replicate())._apply(module, mesh)

    if style in ("rowwise", "experts"):
        return PrepareModuleOutput(output_layouts=Partial(), desired_output_layouts=Replicate())
    if style == "colwise_gather":
        return PrepareModuleOutput(output_layouts=Shard(-1), desired_output_layouts=Replicate())
    if style == "vocab_embedding":
        return VocabEmbedding()
    return None


def install_boundaries(model, mesh) -> None:
    """Install the layout changes with `parallelize_module`, one style per sharded module."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp = model.tensor_parallel
    styles = {path: boundary_style(shard.style, tp.rank, tp.world) for path, shard in tp.modules.items()}
    parallelize_module(model, mesh, {path: s for path, s in styles.items() if s is not None})
    model.device_mesh = mesh
