"""GGUF weights kept packed (the default of `from_pretrained(path.gguf)`): the real SmolLM2-135M-Instruct
file (Q4_1 projections, a Q8_0 embedding tied to the output projection) generates the same greedy
tokens packed as dequantised (`dequantize=True`), in a fraction of the memory, with the embedding
table held once; the plan (and `explain`'s) shows each packed layer's kernel and ggml type, and why
weights were dequantised where they were; the declared layers' references agree with the packed
kernels for every served type; bad blocks fail clearly."""

from pathlib import Path

import numpy as np
import pytest
import torch

import kernelhub
from kernelhub.backends.gguf_embedding import GgufEmbedding
from kernelhub.backends.gguf_linear import GgufLinear
from kernelhub.checkpoint.gguf_packed import _fuse, pack_tensor, unpermute_packed, with_packed_kernels
from kernelhub.declare.errors import CheckpointError, KernelhubError
from kernelhub.declare.ggml_blocks import BLOCKS, random_blocks, torch_dequantize
from kernelhub.declare.reference_layers import QuantizedEmbedding, QuantizedLinear
from kernelhub.registry.conformance import check_layer
from kernelhub.testing.samples import smollm2_gguf

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """A per-run cache, and one thread: 24-token greedy runs take seconds alone, minutes when both
    models' threads contend with a parallel test run for the same cores."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KERNELHUB_CACHE", str(tmp_path_factory.mktemp("kernelhub-cache")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def packed():
    return kernelhub.from_pretrained(smollm2_gguf())  # the default: packed where a kernel serves


@pytest.fixture(scope="module")
def dequantised():
    return kernelhub.from_pretrained(smollm2_gguf(), dequantize=True)


@pytest.fixture(scope="module")
def prompts():
    tok = kernelhub.load_tokenizer(smollm2_gguf())
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    return_tensors="pt")["input_ids"] for p in PROMPTS]


def nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_greedy_tokens_equal_dequantised(packed, dequantised, prompts):
    assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in dequantised.modules())
    for ids in prompts:
        ours = packed.generate(ids, max_new_tokens=24, eos_token_id=None)
        theirs = dequantised.generate(ids, max_new_tokens=24, eos_token_id=None)
        assert ours.shape[1] == ids.shape[1] + 24
        assert ours.tolist() == theirs.tolist()


def test_plan_shows_the_gguf_kernel_and_type(packed):
    quantized = [e for e in packed.binding if "QuantizedLinear" in e.source and e.path != "lm_head"]
    assert len(quantized) == 4 * 30  # qkv, o, gate_up, down in each of 30 layers
    assert all(e.chosen == "gguf" and e.note.startswith("Q4_1") for e in quantized)
    assert "Q4_1" in str(packed.binding)
    # the Q8_0 embedding stays packed, and the tied output projection multiplies by the same blocks
    embed, head = packed.binding["model.embed_tokens"], packed.binding["lm_head"]
    assert embed.chosen in ("gguf", "GgufEmbedding") and embed.note.startswith("Q8_0")
    assert head.chosen == "gguf" and head.note.startswith("Q8_0")
    assert packed.lm_head.qweight is packed.get_input_embeddings().qweight
    assert packed.get_input_embeddings().num_embeddings == 49152


def test_explain_shows_the_plan_from_pretrained_makes(packed, dequantised):
    for dequantize, model in ((None, packed), (True, dequantised)):
        plan = kernelhub.explain(smollm2_gguf(), dequantize=dequantize)
        assert [(e.path, e.chosen, e.note.split(";")[0]) for e in plan] == [
            (e.path, e.chosen, e.note.split(";")[0]) for e in model.binding]
        assert plan.notes == model.binding.notes


def test_training_and_other_devices_dequantise_and_say_why():
    plan = kernelhub.explain(smollm2_gguf(), mode="training")
    assert not [e for e in plan if "Quantized" in e.source]
    assert any("dequantised: mode='training'" in n for n in plan.notes)
    plan = kernelhub.explain(smollm2_gguf(), device="meta")
    assert not [e for e in plan if "Quantized" in e.source]
    assert any("no packed GGUF kernel serves device 'meta'" in n for n in plan.notes)
    assert not kernelhub.explain(smollm2_gguf(), dequantize=True).notes


def test_a_kernel_named_for_packed_layers_keeps_them_packed_on_any_device():
    """A device no built-in packed kernel serves still keeps the blocks when the caller names a kernel for
    them (a Hub GPU build, say): that kernel is asked to serve them, not silently bypassed."""
    plan = kernelhub.explain(smollm2_gguf(), device="meta", kernels={"QuantizedLinear": "reference"})
    linears = [e for e in plan if "QuantizedLinear" in e.source]
    assert len(linears) == 121 and {e.chosen for e in linears} == {"reference"}
    assert not [n for n in plan.notes if "dequantised" in n]
    # an embedding kernel alone is refused: the Linears would unpack their whole weight at every call
    with pytest.raises(KernelhubError, match="names a QuantizedEmbedding kernel but none for QuantizedLinear: no "
                                             "built-in packed kernel serves device 'meta'.*dequantize=True"):
        kernelhub.explain(smollm2_gguf(), device="meta", kernels={"QuantizedEmbedding": "reference"})


def test_packed_weights_take_a_fraction_of_the_memory(packed, dequantised):
    # packed projections (~66 MB) and the Q8_0 embedding (~30 MB, shared with lm_head) in float32
    assert nbytes(packed) <= 150e6 and nbytes(packed) < 0.2 * nbytes(dequantised)


def test_a_packed_load_dequantises_nothing_into_the_cache(packed, tmp_path, monkeypatch):
    """The packed load (and the tokenizer) cache the config and tokenizer only, reading the few float
    tensors from the file: no float copy of the weights is written, and the file is unmapped after.
    `dequantize=True` then adds the float copy."""
    import os

    os.symlink(Path(os.environ["KERNELHUB_CACHE"]) / "cpu", tmp_path / "cpu")  # the built kernels, not rebuilt
    monkeypatch.setenv("KERNELHUB_CACHE", str(tmp_path))
    model = kernelhub.from_pretrained(smollm2_gguf())
    with open("/proc/self/maps") as maps:  # the file is not left mapped: its pages would count as resident
        assert str(smollm2_gguf().resolve()) not in maps.read()
    kernelhub.load_tokenizer(smollm2_gguf(), model=model)
    (converted,) = (tmp_path / "gguf").iterdir()
    assert sorted(f.name for f in converted.iterdir()) == ["config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sum(f.stat().st_size for f in converted.iterdir()) < 4 << 20  # the float copy is 540 MB
    for (name, a), b in zip(model.state_dict().items(), packed.state_dict().values()):
        assert torch.equal(a, b), name
    kept = {f.name: f.stat().st_ino for f in converted.iterdir()}
    kernelhub.from_pretrained(smollm2_gguf(), dequantize=True)
    assert (converted / "model.safetensors").stat().st_size > 500e6
    # the weights are added beside the config and tokenizer, which readers may hold: those stay in place
    assert {f.name: f.stat().st_ino for f in converted.iterdir() if f.name in kept} == kept


def test_user_kernels_choose_the_reference(packed, prompts):
    ref = kernelhub.from_pretrained(smollm2_gguf(), dequantize=False, kernels={"QuantizedLinear": "reference"})
    entries = [e for e in ref.binding if "QuantizedLinear" in e.source]
    assert entries and all(e.chosen == "reference" and e.note.startswith(("Q4_1", "Q8_0")) for e in entries)
    with torch.no_grad():
        ours, theirs = packed(prompts[0]).logits, ref(prompts[0]).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_dequantize_false_needs_a_gguf_file(tmp_path):
    with pytest.raises(KernelhubError, match="not a .gguf file"):
        kernelhub.from_pretrained(tmp_path, dequantize=False)
    with pytest.raises(KernelhubError, match="dequantize='no'; allowed: None"):
        kernelhub.from_pretrained(tmp_path, dequantize="no")


@pytest.mark.parametrize("ggml_type", sorted(BLOCKS), ids=lambda t: BLOCKS[t][0])
def test_reference_and_kernel_agree_for_every_type(ggml_type):
    for dtype in (torch.float32, torch.bfloat16):
        verdict = check_layer(GgufLinear.forward, QuantizedLinear(256, 8, ggml_type, bias=True), dtype, "cpu")
        assert verdict.ok, verdict.reason()
    layer = QuantizedLinear(512, 3, ggml_type)
    layer.qweight.copy_(random_blocks(ggml_type, 3, 512))
    x = torch.randn(2, 512)
    assert torch.allclose(layer(x), x @ torch_dequantize(layer.qweight, ggml_type, (3, 512)).T)
    assert BLOCKS[ggml_type][0] in repr(layer)
    for dtype in (torch.float32, torch.bfloat16):
        verdict = check_layer(GgufEmbedding.forward, QuantizedEmbedding(8, 256, ggml_type), dtype, "cpu")
        assert verdict.ok, verdict.reason()
    table = QuantizedEmbedding(5, 512, ggml_type)
    table.qweight.copy_(random_blocks(ggml_type, 5, 512))
    ids = torch.tensor([[4, 0], [2, 2]])
    values = torch_dequantize(table.qweight, ggml_type, (5, 512))
    assert torch.equal(table(ids), values[ids]) and torch.equal(GgufEmbedding.forward(table, ids), values[ids])


def test_bad_blocks_name_the_tensor():
    with pytest.raises(CheckpointError, match=r"'blk\.3\.attn_q\.weight'.*Q2_K.*not served.*Q4_0"):
        pack_tensor("blk.3.attn_q.weight", np.zeros((2, 84), np.uint8), 10, (2, 256))  # Q2_K
    with pytest.raises(CheckpointError, match=r"'blk\.3\.attn_q\.weight'.*ggml type 99"):
        pack_tensor("blk.3.attn_q.weight", np.zeros((2, 84), np.uint8), 99, (2, 256))
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_up\.weight' \(Q4_1.*holds 39 bytes.*truncated"):
        pack_tensor("blk.0.ffn_up.weight", np.zeros(39, np.uint8), 3, (2, 32))
    with pytest.raises(CheckpointError, match=r"'blk\.0\.ffn_up\.weight'.*whole number"):
        pack_tensor("blk.0.ffn_up.weight", np.zeros(40, np.uint8), 3, (2, 33))
    assert pack_tensor("t", np.arange(40, dtype=np.uint8), 3, (2, 32)).shape == (2, 20)


def test_rows_permute_and_fuse_like_float_rows():
    blocks = random_blocks(8, 8, 64)
    values = torch_dequantize(blocks, 8, (8, 64))
    unpermuted = unpermute_packed(blocks, 2, "q")
    assert torch.equal(torch_dequantize(unpermuted, 8, (8, 64)),
                       values.reshape(2, 2, 2, 64).transpose(1, 2).reshape(8, 64))

    class Model:
        FUSED = {"qkv": ("q", "k", "v")}

    one = {f"l.{p}.weight": (random_blocks(8, 2, 64), 8, 64) for p in "qkv"}
    fused, notes = _fuse(Model(), one)
    assert list(fused) == ["l.qkv.weight"] and fused["l.qkv.weight"][0].shape == (6, 68) and not notes
    mixed = {**one, "l.v.weight": (random_blocks(3, 2, 64), 3, 64)}
    fused, notes = _fuse(Model(), mixed)  # parts of different types stay apart, each packed
    assert not notes and [len(b) for b in fused["l.qkv.weight"][0]] == [2, 2, 2] and fused["l.qkv.weight"][1] == (
        8, 8, 3)
    partial = {k: v for k, v in one.items() if k != "l.v.weight"}  # v of a type with no packed kernel
    fused, notes = _fuse(Model(), partial)
    assert not fused and "l.qkv dequantised" in notes[0] and "(theirs: Q8_0)" in notes[0]


def test_a_users_quantized_linear_request_wins():
    both = {"QuantizedLinear": ["gguf", "reference"], "QuantizedEmbedding": ["gguf", "reference"]}
    assert with_packed_kernels(None) == both
    # a file whose weights are all float (or of types with no kernel) packs nothing and asks for nothing
    assert with_packed_kernels(None, model=torch.nn.Sequential(torch.nn.Linear(2, 2))) is None
    assert with_packed_kernels({"RMSNorm": "reference"}) == {"RMSNorm": "reference", **both}
    assert with_packed_kernels({"QuantizedLinear": "reference"}) == {
        "QuantizedLinear": "reference", "QuantizedEmbedding": ["gguf", "reference"]}


def test_importing_kernelhub_leaves_the_packed_kernels_unloaded():
    """Their op registration loads torch's compiler, which must not happen before a test conftest (or a
    user) sets TRITON_INTERPRET."""
    import subprocess
    import sys

    code = "import sys, kernelhub; print(sorted(m for m in sys.modules if 'gguf_quant' in m or m == 'torch._dynamo'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
    from kernelhub.runtime.gguf_packing import packed_devices

    assert packed_devices() == GgufLinear.devices == GgufEmbedding.devices


def test_save_pretrained_of_a_packed_model_says_how_to_save_it(tmp_path):
    from gguf import GGMLQuantizationType

    from tests.gguf_files import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", hidden=64, ggml_type=GGMLQuantizationType.Q8_0)
    model = kernelhub.from_pretrained(path)
    with pytest.raises(CheckpointError, match=r"keeps GGUF blocks packed \(Quantized.*dequantize=True"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "config.json").exists()
    kernelhub.from_pretrained(path, dequantize=True).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_cli_explain_shows_packed_kernels_and_dequantize_shows_float_linears(capsys):
    from kernelhub.cli.commands import main

    assert main(["explain", str(smollm2_gguf())]) == 0
    packed = capsys.readouterr().out
    assert "builtin (QuantizedLinear) (Q4_1;" in packed and "builtin (QuantizedEmbedding) (Q8_0;" in packed
    assert main(["explain", str(smollm2_gguf()), "--dequantize"]) == 0
    floats = capsys.readouterr().out
    assert "Quantized" not in floats and "model (Linear)" in floats
