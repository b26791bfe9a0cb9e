"""Tensor parallelism on two CPU ranks (gloo): the same tokens as one process, half the weights per
rank, slices read from the files, every rank deciding alike, and clear refusals.

One pair of ranks (`tests/tp_worker.py`) runs every family and every bad input, so the processes
start once; it is bounded in time and its processes are killed whatever happens.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kernelhub
from kernelhub.cli.commands import main
from kernelhub.kernel.build import build_kernel
from tests.checkpoints import write_family_checkpoint, write_hf_checkpoint, write_qwen3_checkpoint

ROOT = Path(__file__).parent.parent
TIME_BOUND = 180  # seconds for both ranks, start-up included (two busy cores)
# llama: tied embeddings; qwen2: sliding layers, q/k/v biases; qwen3: q/k norms, o_proj bias;
# qwen3_moe: tensor-parallel experts on layers 1 and 3, a dense MLP on 0 and 2; gemma2: four norms per
# layer, tied embeddings, softcaps (eager: sdpa has no softcap); gpt_oss: q/k/v/o biases, per-head sinks,
# biased experts in gpt-oss's interleaved, transposed file layout
FAMILIES = {"llama": (write_hf_checkpoint, {}), "qwen2": (write_hf_checkpoint, {"num_key_value_heads": 2}),
            "qwen3": (write_qwen3_checkpoint, {}), "qwen3_moe": (write_qwen3_checkpoint, {}),
            "gemma2": (write_family_checkpoint, {}), "gpt_oss": (write_family_checkpoint, {})}
ATTN = {family: "paged|eager" if family == "gemma2" else "paged|sdpa" for family in FAMILIES}
HUB_KERNELS = ROOT / "hub_kernels"
LOCAL_KERNELS = {"RMSNorm": str(HUB_KERNELS / "rmsnorm"), "SiLUAndMul": str(HUB_KERNELS / "silu-and-mul")}
SPEC = {"prompt": [[0, 0, 5, 7, 9, 3], [1, 5, 7, 9, 3, 4]], "mask": [[0, 0, 1, 1, 1, 1], [1] * 6],
        "prompts": [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]], "new": 8}
# config.json only (no weights): sizes are refused before any file of the checkpoint is opened
BAD_CONFIGS = {"heads3": {"num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 48},
               "kv3": {"num_attention_heads": 6, "num_key_value_heads": 3, "hidden_size": 96},
               "inter95": {"intermediate_size": 95}, "vocab97": {"vocab_size": 97}}


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over 'w0'..'wN' whose ids fit the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    paths = {}
    for family, (write, overrides) in FAMILIES.items():
        paths[family] = root / family
        write(family, paths[family], **overrides)
    write_tokenizer(paths["llama"], 96)
    bad = {"llama": str(paths["llama"]), "kv1": str(root / "qwen2-kv1")}
    write_hf_checkpoint("qwen2", bad["kv1"])  # one kv head: two ranks cannot split it
    config = json.loads((paths["llama"] / "config.json").read_text())
    for name, overrides in BAD_CONFIGS.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({**config, **overrides}))
        bad[name] = str(root / name)
    return root, paths, bad


def single_process(path, attn="paged|sdpa") -> dict:
    model = kernelhub.from_pretrained(path, attn_implementation=attn)
    model.generation_config.eos_token_id = None  # every run makes all its tokens
    ids, mask = torch.tensor(SPEC["prompt"]), torch.tensor(SPEC["mask"])
    results = model.generate_batch(SPEC["prompts"], max_new_tokens=SPEC["new"])
    return {"greedy": model.generate(ids, attention_mask=mask, max_new_tokens=SPEC["new"]).tolist(),
            "batch": [r.tokens for r in results],
            "params": {n: p.numel() for n, p in model.named_parameters()},
            "shapes": {n: tuple(p.shape) for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def single(checkpoints):
    return {family: single_process(path, ATTN[family]) for family, path in checkpoints[1].items()}


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill `proc` and every process it started, if still running (torchrun starts each rank in a
    session of its own, so killing the process group alone would leave them)."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def launch(spec_file: Path, timeout: float) -> list[str]:
    """Start both ranks; return their output. Both are killed (whole process groups) on any failure.

    Each rank writes to a file, read once both have ended: a rank waiting on a full pipe while the
    other is being waited for would deadlock the pair."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    logs = [spec_file.parent / f"rank{rank}.log" for rank in (0, 1)]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(log, "w")) for log in logs]
        procs = [subprocess.Popen([sys.executable, "-m", "tests.tp_worker", str(spec_file), str(rank)], cwd=ROOT,
                                  env=env, stdout=files[rank], stderr=subprocess.STDOUT, start_new_session=True)
                 for rank in (0, 1)]
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"the two ranks did not finish within {timeout} s")
        finally:
            for p in procs:
                kill_tree(p)
    return [log.read_text(errors="replace") for log in logs]


@pytest.fixture(scope="module")
def ranks(checkpoints, tmp_path_factory):
    root, paths, bad = checkpoints
    out = tmp_path_factory.mktemp("tp-out")
    for directory in LOCAL_KERNELS.values():  # the ranks import them from the built variants
        build_kernel(Path(directory))
    spec = {**SPEC, "families": {f: str(p) for f, p in paths.items()}, "attn": ATTN, "bad": bad,
            "local_kernels": LOCAL_KERNELS, "store": str(out / "store"), "out": str(out), "scratch": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    logs = launch(out / "spec.json", TIME_BOUND)
    results = []
    for rank, log in enumerate(logs):
        file = out / f"rank{rank}.json"
        assert file.is_file(), f"rank {rank} wrote no result:\n{log[-4000:]}"
        result = json.loads(file.read_text())
        assert "crash" not in result, result["crash"]
        results.append(result)
    return results


def test_ranks_that_print_more_than_a_pipe_holds_and_wait_for_each_other_finish(tmp_path):
    """Both ranks write far more than a pipe buffer before a barrier: reading one rank's output to its
    end before the other's would leave the second blocked on its pipe and the first at the barrier."""
    flood = 1 << 20
    spec = {"flood": flood, "store": str(tmp_path / "store"), "out": str(tmp_path)}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    logs = launch(tmp_path / "spec.json", 60)
    assert [len(log.strip()) for log in logs] == [flood, flood]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["flooded"] for r in (0, 1)] == [flood, flood]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_single_process(ranks, single, family):
    for result in ranks:
        assert result["families"][family]["greedy"] == single[family]["greedy"]
        assert result["families"][family]["greedy_static"] == single[family]["greedy"]  # this rank's kv heads


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batch_equal_on_both_ranks_and_single_process(ranks, single, family):
    first, second = (r["families"][family] for r in ranks)
    assert first["batch"] == second["batch"] == single[family]["batch"]
    assert first["batch_stats"] == second["batch_stats"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_holds_half_of_the_sharded_parameters(ranks, single, family):
    full = single[family]["params"]
    local = [r["families"][family]["params"] for r in ranks]
    assert set(local[0]) == set(local[1]) == set(full)
    sharded = [n for n in full if local[0][n] < full[n]]
    for n in sharded:  # measured from each rank's local shards
        assert local[0][n] == local[1][n] == full[n] // 2, n
    for n in set(full) - set(sharded):  # norms: whole on every rank
        assert local[0][n] == local[1][n] == full[n], n
    total, split = sum(full.values()), sum(full[n] for n in sharded)
    assert split > 0.9 * total  # nearly every weight is split ...
    for params in local:  # ... so each rank holds about half the model
        assert abs(sum(params.values()) - total / 2) < 0.06 * total


def expected_read(name: str, nbytes: int) -> list[int]:
    """Bytes each of the two ranks should read of the file tensor `name`."""
    if name.endswith(("mlp.gate.weight", "mlp.router.weight", "mlp.router.bias")) or "norm" in name:
        return [nbytes] * 2  # the MoE routers and the norms: whole on every rank
    if name.endswith(("o_proj.bias", "down_proj.bias", "experts.down_proj_bias")):
        return [nbytes, 0]  # a rowwise bias is added once: rank 0 holds it
    return [nbytes // 2] * 2  # every other tensor: half of it, as rows, columns or heads


@pytest.mark.parametrize("family", FAMILIES)
def test_each_rank_reads_only_its_slices(ranks, checkpoints, family):
    path = checkpoints[1][family]
    with safe_open(path / "model.safetensors", framework="pt") as f:
        sizes = {n: f.get_slice(n).get_shape() for n in f.keys()}
    nbytes = {n: 4 * torch.Size(s).numel() for n, s in sizes.items()}
    reads = [r["families"][family]["reads"] for r in ranks]
    for read in reads:
        assert read["whole"] == [] and read["full_loads"] == 0  # never get_tensor, never load_file
        assert sum(read["bytes"].values()) < 0.56 * sum(nbytes.values())
    for name, shape in sizes.items():
        got = [read["bytes"].get(name, 0) for read in reads]
        assert got == expected_read(name, nbytes[name]), name
        if got == [nbytes[name] // 2] * 2 and len(shape) >= 2:  # one slice: half of one dim, the rest whole
            halves = [[n // 2 if i == d else n for i, n in enumerate(shape)] for d in range(len(shape))]
            for read in reads:
                assert all(s in halves for s in read["shapes"][name]), (name, read["shapes"][name])
    if family == "gpt_oss":  # experts are read from the file's interleaved gate/up: one slice of the last dim
        shape = sizes["model.layers.0.mlp.experts.gate_up_proj"]
        assert reads[1]["shapes"]["model.layers.0.mlp.experts.gate_up_proj"] == [shape[:2] + [shape[2] // 2]]


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_sites_and_kv_pools_hold_local_heads(ranks, checkpoints, family):
    config = json.loads((checkpoints[1][family] / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    for result in ranks:
        fam = result["families"][family]
        sites = [e for e in fam["plan"] if e["kind"] == "attention"]
        assert sites and all(e["sharding"].startswith(f"heads {heads} -> {heads // 2}, kv heads {kv} -> {kv // 2}")
                             for e in sites)
        assert fam["kv_pool_heads"] == kv // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_the_plan_records_each_modules_sharding(ranks, family):
    for rank, result in enumerate(ranks):
        fam = result["families"][family]
        tp = fam["tensor_parallel"]
        assert tp["tp_size"] == 2 and tp["rank"] == rank
        styles = {p: m["style"] for p, m in tp["modules"].items()}
        assert styles["model.embed_tokens"] == "vocab_embedding" and styles["lm_head"] == "colwise_gather"
        assert styles["model.layers.1.self_attn.qkv_proj"] == "packed_colwise" and styles["model.norm"] == "replicated"
        if family != "gpt_oss":  # a dense MLP on layer 0
            assert styles["model.layers.0.mlp.gate_up_proj"] == "packed_colwise"
            assert styles["model.layers.0.mlp.down_proj"] == "rowwise"
        if family == "gemma2":  # four norms per layer, whole on every rank
            assert all(styles[f"model.layers.0.{n}_layernorm"] == "replicated"
                       for n in ("input", "post_attention", "pre_feedforward", "post_feedforward"))
        if family == "gpt_oss":  # each head's sink with its q head; experts split along intermediate_size=32
            sinks = tp["modules"]["model.layers.0.self_attn"]
            assert sinks["style"] == "heads" and sinks["params"]["sinks"]["ranges"] == [[2 * rank, 2 * rank + 2]]
            experts = tp["modules"]["model.layers.2.mlp.experts"]["params"]
            assert experts["gate_up_proj"]["local_shape"] == [4, 32, 64] and experts["down_proj"]["dim"] == 2
            assert experts["gate_up_proj"]["ranges"] == [[16 * rank, 16 * rank + 16], [32 + 16 * rank, 48 + 16 * rank]]
            assert experts["gate_up_proj_bias"]["local_shape"] == [4, 32] and experts["down_proj_bias"]["partial"]
            assert styles["model.layers.0.mlp.router"] == "replicated"
        if family == "qwen3_moe":
            experts = tp["modules"]["model.layers.1.mlp.experts"]
            assert experts["style"] == "experts" and styles["model.layers.1.mlp.gate"] == "replicated"
            assert experts["params"]["gate_up_proj"]["local_shape"] == [8, 32, 64]  # 8 experts, I=32: 2 x 16 rows
            assert experts["params"]["gate_up_proj"]["ranges"] == [[16 * rank, 16 * rank + 16],
                                                                   [32 + 16 * rank, 48 + 16 * rank]]
            assert experts["params"]["down_proj"]["local_shape"] == [8, 64, 16]
        vocab = tp["modules"]["lm_head"]["params"]["weight"]
        assert vocab["ranges"] == [[rank * 48, rank * 48 + 48]] and vocab["local_shape"] == [48, 64]
        qkv = {e["path"]: e for e in fam["plan"]}["model.layers.0.self_attn.qkv_proj"]
        assert qkv["sharding"].startswith("packed_colwise: weight") and f"rank {rank} of 2" in qkv["sharding"]
        assert f"tensor parallel: rank {rank} of 2" in fam["plan_text"] and "vocab_embedding" in fam["plan_text"]


def test_ranks_agree_on_one_kv_budget_and_schedule_alike(ranks, single):
    first, second = (r["families"]["llama"] for r in ranks)
    assert first["tight_blocks_asked"] != second["tight_blocks_asked"]  # each rank asked for another budget
    assert first["tight_stats"] == second["tight_stats"]  # one pool size, the same steps and preemptions
    assert first["tight_stats"]["num_blocks"] == min(first["tight_blocks_asked"], second["tight_blocks_asked"])
    assert first["tight_stats"]["preemptions"] > 0  # the small pool did force decisions
    assert first["tight_batch"] == second["tight_batch"] == single["llama"]["batch"]


def test_sampling_without_a_seed_gives_every_rank_rank_0s_tokens(ranks):
    first, second = (r["families"]["llama"] for r in ranks)
    assert first["sampled"] == second["sampled"] and first["sampled_batch"] == second["sampled_batch"]


def test_a_layer_kernel_binds_and_runs_on_local_shards(ranks, single):
    full = single["llama"]["shapes"]
    for result in ranks:
        fam = result["families"]["llama"]
        assert fam["kernel_greedy"] == single["llama"]["greedy"]
        chosen = {e["path"]: e["chosen"] for e in fam["kernel_plan"]}
        assert chosen["model.layers.0.self_attn.qkv_proj"] == "RecordingLinear"
        seen = {tuple(s) for s in fam["kernel_shapes"]}
        linears = {fam_shape(full[n], n) for n in full if n.endswith("proj.weight")}
        vocab, hidden = full["model.embed_tokens.weight"]  # lm_head: tied to the embedding here
        assert seen == linears | {(vocab // 2, hidden)}


def test_an_experts_kernel_binds_and_runs_on_local_expert_shards(ranks, single):
    for result in ranks:
        fam = result["families"]["qwen3_moe"]
        assert fam["experts_kernel_greedy"] == single["qwen3_moe"]["greedy"]
        entry = {e["path"]: e for e in fam["experts_kernel_plan"]}["model.layers.1.mlp.experts"]
        assert entry["chosen"] == "grouped_mm" and "-> (8, 32, 64)" in entry["sharding"]


def test_local_layer_kernels_bind_per_rank_and_run_on_local_shards(ranks, single):
    """Kernels from local directories in the Hub layout (Triton, under the interpreter on CPU) bind on
    every rank; the gated activation sees this rank's half of the intermediate size."""
    intermediate = single["llama"]["shapes"]["model.layers.0.mlp.down_proj.weight"][1]
    for result in ranks:
        fam = result["families"]["llama"]
        assert fam["local_greedy"] == single["llama"]["greedy"]
        entries = {e["path"]: e for e in fam["local_plan"]}
        for path, name in (("model.layers.0.mlp.act", "SiLUAndMul"), ("model.norm", "RMSNorm")):
            assert entries[path]["source"] == f"local {LOCAL_KERNELS[name]} ({name})", entries[path]
        assert fam["local_act_widths"] == [intermediate]  # gate and up halves of I/2 each: 2 * I/2


def fam_shape(shape, name):
    """The local shape of a Linear weight on 2 ranks: rowwise ones split columns, the rest rows."""
    return (shape[0], shape[1] // 2) if name.endswith(("o_proj.weight", "down_proj.weight")) else \
        (shape[0] // 2, shape[1])


def test_run_with_tp_prints_from_rank_0_only(ranks):
    first, second = (r["families"]["llama"]["cli"] for r in ranks)
    assert first["status"] == second["status"] == 0
    assert first["stdout"].strip() and "tokens/s" in first["stderr"]
    assert second["stdout"] == second["stderr"] == ""


def test_save_pretrained_of_a_sharded_model_is_refused(ranks):
    refused = ranks[0]["families"]["llama"]["save_refused"]
    assert refused["error"] == "CheckpointError" and "one rank's shards" in refused["message"]


BAD = {
    "no_module": ["tp_plan key 'model.layers.*.mlp.nope' matches no module", "closest: 'model.layers.0.mlp'"],
    "unknown_style": ["'colwize' is not a style", "Did you mean 'colwise'?", "packed_colwise"],
    "kv_heads": ["tp_size=2 is larger than num_key_value_heads=1", "at least one kv head"],
    "heads": ["num_attention_heads=3 is not divisible by tp_size=2", "tp sizes that divide"],
    "kv_divisible": ["num_key_value_heads=3 is not divisible by tp_size=2"],
    "intermediate": ["size 95 (intermediate_size)", "not divisible by tp_size=2"],
    "vocab": ["vocab_size=97 is not divisible by tp_size=2"],
    "mixed_devices": ["mixed devices (rank 0 cpu, rank 1 cuda)", "one device type on every rank"],
    "mesh_device": ["device cuda does not match the device mesh's 'cpu'"],
    "tp_size": ["tp_size=3 but the process group has 2 ranks"],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_on_every_rank_before_anything_is_read(ranks, case):
    outcomes = [r["bad"][case] for r in ranks]
    for outcome in outcomes:
        assert outcome["error"] == "TensorParallelError", outcome
        for phrase in BAD[case]:
            assert phrase in outcome["message"], outcome["message"]
        assert outcome["opened"] == outcome["full_loads"] == 0  # no weight was read
    assert outcomes[0]["message"] == outcomes[1]["message"]


# -- in this process: no process group ----------------------------------------------------------------------

def test_tp_plan_outside_a_process_group_says_to_run_under_torchrun(checkpoints):
    path = checkpoints[1]["llama"]
    with pytest.raises(kernelhub.TensorParallelError, match="initialised torch.distributed process group.*torchrun"):
        kernelhub.from_pretrained(path, tp_plan="auto")
    with pytest.raises(kernelhub.TensorParallelError, match="tp_size= and device_mesh= shard a model only together"):
        kernelhub.from_pretrained(path, tp_size=2)
    with pytest.raises(kernelhub.TensorParallelError, match="inference only .*mode='training'"):
        kernelhub.from_pretrained(path, tp_plan="auto", mode="training")


def test_explain_prints_one_ranks_plan_without_a_process_group(checkpoints, capsys):
    path = str(checkpoints[1]["qwen2"])
    assert main(["explain", path, "--tp", "2"]) == 0
    text = capsys.readouterr().out
    assert "tensor parallel: rank 0 of 2" in text and "heads 4 -> 2, kv heads 2 -> 1" in text
    assert "packed_colwise: weight (128, 64) -> (64, 64), bias (128,) -> (64,), parts 64+32+32" in text
    assert main(["explain", path, "--tp", "2", "--tp-rank", "1", "--json"]) == 0
    entries = {e["path"]: e for e in json.loads(capsys.readouterr().out)}
    assert "rank 1 of 2" in entries["lm_head"]["sharding"]
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("argv, phrase", [
    (["--tp-rank", "5"], "--tp-rank 5 needs --tp N (the number of ranks)"),
    (["--tp", "2", "--tp-rank", "2"], "--tp-rank 2 is not a rank of --tp 2; valid: 0..1"),
    (["--tp", "2", "--tp-rank", "-1"], "--tp-rank -1 is not a rank of --tp 2; valid: 0..1"),
])
def test_explain_refuses_a_tp_rank_without_tp_or_out_of_range(checkpoints, capsys, argv, phrase):
    assert main(["explain", str(checkpoints[1]["llama"]), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and phrase in captured.err, captured.err


def test_explain_refuses_a_tp_size_that_does_not_divide(checkpoints, capsys):
    assert main(["explain", str(checkpoints[1]["llama"]), "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tp_size=3 is larger than num_key_value_heads=2" in err


def test_run_with_tp_refuses_sizes_in_one_line_before_starting_ranks(checkpoints, capsys):
    assert main(["run", str(checkpoints[1]["llama"]), "--prompt", "w1 w2", "--tp", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tp_size=3 is larger than num_key_value_heads=2" in err


def test_run_with_tp_starts_the_ranks_itself_and_prints_once(checkpoints):
    """`kernelhub run --tp 2` outside torchrun starts two ranks under torch.distributed.run."""
    command = [sys.executable, "-m", "kernelhub", "run", str(checkpoints[1]["llama"]), "--prompt", "w3 w5 w7",
               "--max-new-tokens", "4", "--tp", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIME_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kernelhub run --tp 2 did not finish within {TIME_BOUND} s")
    finally:
        kill_tree(proc)
    assert proc.returncode == 0, err
    words = out.split()
    assert len(words) == 4 and all(w.startswith("w") for w in words), out  # one answer: rank 0's
    assert err.count("tokens/s") == 1, err
