"""One rank of the 2-rank tensor-parallel tests: `python -m tests.tp_worker SPEC.json RANK`.

Joins a gloo group (file store), loads every family with `tp_plan="auto"`, generates, tries
each bad input, and writes what it saw to `<out>/rank<RANK>.json` for the test to compare
with single-process runs. safetensors reads are counted by wrapping `safe_open` where the
tensor-parallel loader uses it, and `load_file` where a full load would.
"""

import collections
import contextlib
import datetime
import io
import json
import sys
import traceback

import torch
import torch.distributed as dist

import kernelhub
import kernelhub.checkpoint.hf_layout as checkpoint
import kernelhub.runtime.tensor_parallel_load as tp_load
from kernelhub.cli.commands import main as cli_main
from kernelhub.runtime.batching import ContinuousBatcher


class Reads:
    """What safetensors handed out: files opened, whole tensors, slices (bytes and shapes per tensor)."""

    def __init__(self):
        self.opened, self.full_loads, self.whole = 0, 0, []
        self.bytes, self.shapes = collections.Counter(), collections.defaultdict(list)

    def snapshot(self):
        return {"opened": self.opened, "full_loads": self.full_loads, "whole": list(self.whole),
                "bytes": dict(self.bytes), "shapes": {k: list(v) for k, v in self.shapes.items()}}


def instrument(reads: Reads):
    real_open, real_load = tp_load.safe_open, checkpoint.load_file

    class Slice:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def get_shape(self):
            return self.inner.get_shape()

        def __getitem__(self, index):
            tensor = self.inner[index]
            reads.bytes[self.name] += tensor.numel() * tensor.element_size()
            reads.shapes[self.name].append(list(tensor.shape))
            return tensor

    class Handle:
        def __init__(self, inner):
            self.inner = inner

        def keys(self):
            return self.inner.keys()

        def get_slice(self, name):
            return Slice(name, self.inner.get_slice(name))

        def get_tensor(self, name):
            reads.whole.append(name)
            return self.inner.get_tensor(name)

    @contextlib.contextmanager
    def counted_open(file, framework="pt", device="cpu"):
        reads.opened += 1
        with real_open(file, framework=framework, device=device) as handle:
            yield Handle(handle)

    def counted_load(*args, **kwargs):
        reads.full_loads += 1
        return real_load(*args, **kwargs)

    tp_load.safe_open, checkpoint.load_file = counted_open, counted_load


class RecordingLinear(torch.nn.Module):
    """An in-process `Linear` kernel that records the weight shapes it runs on."""

    seen: set = set()

    def forward(self, x):
        RecordingLinear.seen.add(tuple(self.weight.shape))
        return torch.nn.functional.linear(x, self.weight, self.bias)


def greedy(model, spec, **kwargs):
    ids, mask = torch.tensor(spec["prompt"]), torch.tensor(spec["mask"])
    return model.generate(ids, attention_mask=mask, max_new_tokens=spec["new"], **kwargs).tolist()


def batch(model, spec, **kwargs):
    results = model.generate_batch(spec["prompts"], max_new_tokens=spec["new"], **kwargs)
    return [r.tokens for r in results], results.stats


def family(name, path, spec, reads: Reads, rank: int) -> dict:
    reads.whole.clear(), reads.bytes.clear(), reads.shapes.clear()
    model = kernelhub.from_pretrained(path, attn_implementation=spec["attn"][name], tp_plan="auto")
    model.generation_config.eos_token_id = None  # every run makes all its tokens
    out = {"reads": reads.snapshot()}
    out["params"] = {n: p.numel() for n, p in model.named_parameters()}
    out["plan"] = model.binding.to_dict()
    out["plan_text"] = str(model.binding)
    out["tensor_parallel"] = model.binding.tensor_parallel
    out["greedy"] = greedy(model, spec)
    tokens, stats = batch(model, spec)
    out["batch"], out["batch_stats"] = tokens, stats
    out["kv_pool_heads"] = ContinuousBatcher(model, kv_memory=1 << 20).cache.keys[0].shape[2]
    out["greedy_static"] = greedy(model, spec, cache="static")  # make_cache sizes it with this rank's kv heads
    if name == "llama":
        out.update(llama_extras(model, path, spec, rank))
    if name == "qwen3_moe":  # an Experts kernel binds and runs on the local expert shards
        grouped = kernelhub.from_pretrained(path, attn_implementation="paged|sdpa", kernels={"Experts": "grouped_mm"},
                                            tp_plan="auto")
        grouped.generation_config.eos_token_id = None
        out["experts_kernel_greedy"] = greedy(grouped, spec)
        out["experts_kernel_plan"] = grouped.binding.to_dict()
    return out


def llama_extras(model, path, spec, rank: int) -> dict:
    out = {}
    # every rank asks for a different KV budget: they must agree on one (the smallest) and schedule alike
    layers, attn = model.config.num_hidden_layers, model.model.layers[0].self_attn.attn
    block = 4
    per_block = 2 * layers * block * attn.num_kv_heads * attn.head_dim * 4
    tokens, stats = batch(model, spec, block_size=block, kv_memory=per_block * (6 + 40 * rank), max_batch_tokens=8)
    out["tight_batch"], out["tight_stats"], out["tight_blocks_asked"] = tokens, stats, 6 + 40 * rank
    # sampling without a seed: each rank's own generator differs, yet every rank gets rank 0's tokens
    torch.manual_seed(1000 + rank)
    out["sampled"] = greedy(model, spec, do_sample=True, temperature=1.0)
    out["sampled_batch"] = batch(model, spec, do_sample=True, temperature=1.0)[0]
    # a layer kernel binds and runs on local shards
    RecordingLinear.seen.clear()
    with_kernel = kernelhub.from_pretrained(path, attn_implementation="paged|sdpa", kernels={"Linear": RecordingLinear},
                                            tp_plan="auto")
    with_kernel.generation_config.eos_token_id = None
    out["kernel_greedy"] = greedy(with_kernel, spec)
    out["kernel_shapes"] = sorted(RecordingLinear.seen)
    out["kernel_plan"] = with_kernel.binding.to_dict()
    out.update(local_kernels(path, spec))
    out["save_refused"] = attempt(lambda: model.save_pretrained(spec["scratch"] + f"/save{rank}"))
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli_main(["run", path, "--prompt", "w3 w5 w7", "--max-new-tokens", "4", "--tp", "2"])
    out["cli"] = {"status": status, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
    return out


def local_kernels(path, spec) -> dict:
    """Layer kernels from local directories in the Hub layout bind per rank; the gated activation runs on
    this rank's half of the intermediate size (its input width is recorded by a forward pre-hook)."""
    model = kernelhub.from_pretrained(path, attn_implementation="paged|sdpa", kernels=spec["local_kernels"],
                                      tp_plan="auto")
    model.generation_config.eos_token_id = None
    widths = set()
    for layer in model.model.layers:
        layer.mlp.act.register_forward_pre_hook(lambda _, args: widths.add(args[0].shape[-1]))
    return {"local_greedy": greedy(model, spec), "local_plan": model.binding.to_dict(),
            "local_act_widths": sorted(widths)}


def attempt(fn) -> dict:
    try:
        fn()
    except kernelhub.KernelhubError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None}


def bad_inputs(spec, reads: Reads, rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    paths, out = spec["bad"], {}
    cases = {
        "no_module": lambda: kernelhub.from_pretrained(paths["llama"], tp_plan={"model.layers.*.mlp.nope": "colwise"}),
        "unknown_style": lambda: kernelhub.from_pretrained(paths["llama"], tp_plan={"lm_head": "colwize"}),
        "kv_heads": lambda: kernelhub.from_pretrained(paths["kv1"], tp_plan="auto"),
        "heads": lambda: kernelhub.from_pretrained(paths["heads3"], tp_plan="auto"),
        "kv_divisible": lambda: kernelhub.from_pretrained(paths["kv3"], tp_plan="auto"),
        "intermediate": lambda: kernelhub.from_pretrained(paths["inter95"], tp_plan="auto"),
        "vocab": lambda: kernelhub.from_pretrained(paths["vocab97"], tp_plan="auto"),
        "mixed_devices": lambda: kernelhub.from_pretrained(paths["llama"], tp_plan="auto",
                                                           device="cpu" if rank == 0 else "cuda"),
        "mesh_device": lambda: kernelhub.from_pretrained(paths["llama"], tp_plan="auto", device="cuda",
                                                         device_mesh=init_device_mesh("cpu", (2,))),
        "tp_size": lambda: kernelhub.from_pretrained(paths["llama"], tp_plan="auto", tp_size=3),
    }
    for name, case in cases.items():
        opened, loads = reads.opened, reads.full_loads
        out[name] = attempt(case)
        out[name]["opened"], out[name]["full_loads"] = reads.opened - opened, reads.full_loads - loads
    return out


def run(spec_file: str, rank: int) -> None:
    spec = json.loads(open(spec_file).read())
    # a rank that crashed leaves the other waiting in a collective: give up after a minute, not half an hour
    dist.init_process_group("gloo", init_method=f"file://{spec['store']}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    if spec.get("flood"):  # much output, then wait for the other rank: the test must drain both ranks at once
        sys.stdout.write("x" * spec["flood"] + "\n")
        sys.stdout.flush()
        dist.barrier()
        with open(f"{spec['out']}/rank{rank}.json", "w") as f:
            json.dump({"rank": rank, "flooded": spec["flood"]}, f)
        dist.destroy_process_group()
        return
    reads, result = Reads(), {"rank": rank}
    instrument(reads)
    try:
        result["families"] = {name: family(name, path, spec, reads, rank) for name, path in spec["families"].items()}
        result["bad"] = bad_inputs(spec, reads, rank)
    except BaseException:  # noqa: BLE001 - the test shows the traceback; the other rank is killed by the test's time bound
        result["crash"] = traceback.format_exc()
    with open(f"{spec['out']}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    if "crash" not in result:
        dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
