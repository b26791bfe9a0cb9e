"""GGUF weights kept packed (`from_pretrained(..., dequantize=False)`): the real SmolLM2-135M-Instruct
file (Q4_1 projections, a Q8_0 embedding) generates the same greedy tokens packed as dequantised, in
a fraction of the memory; the plan shows each QuantizedLinear's kernel and ggml type; the declared
layer's reference agrees with the packed kernel for every served type; bad blocks fail clearly."""

import numpy as np
import pytest
import torch

import kernelhub
from kernelhub.backends.gguf_linear import GgufLinear
from kernelhub.checkpoint.gguf_packed import _fuse, pack_tensor, unpermute_packed, with_packed_kernels
from kernelhub.declare.errors import CheckpointError, KernelhubError
from kernelhub.declare.ggml_blocks import BLOCKS, random_blocks, torch_dequantize
from kernelhub.declare.reference_layers import QuantizedLinear
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
    return kernelhub.from_pretrained(smollm2_gguf(), dequantize=False)


@pytest.fixture(scope="module")
def dequantised():
    return kernelhub.from_pretrained(smollm2_gguf())


@pytest.fixture(scope="module")
def prompts():
    tok = kernelhub.load_tokenizer(smollm2_gguf())
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                    return_tensors="pt")["input_ids"] for p in PROMPTS]


def nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_greedy_tokens_equal_dequantised(packed, dequantised, prompts):
    assert not any(isinstance(m, QuantizedLinear) for m in dequantised.modules())  # the default is unchanged
    for ids in prompts:
        ours = packed.generate(ids, max_new_tokens=24, eos_token_id=None)
        theirs = dequantised.generate(ids, max_new_tokens=24, eos_token_id=None)
        assert ours.shape[1] == ids.shape[1] + 24
        assert ours.tolist() == theirs.tolist()


def test_plan_shows_the_gguf_kernel_and_type(packed):
    quantized = [e for e in packed.binding if "QuantizedLinear" in e.source]
    assert len(quantized) == 4 * 30  # qkv, o, gate_up, down in each of 30 layers; lm_head is tied
    assert all(e.chosen == "gguf" and e.note.startswith("Q4_1") for e in quantized)
    assert "Q4_1" in str(packed.binding)
    assert packed.binding["lm_head"].chosen == "reference"  # tied to the Q8_0 embedding: dequantised


def test_packed_weights_take_a_fraction_of_the_memory(packed, dequantised):
    assert nbytes(packed) < 0.4 * nbytes(dequantised)
    small = kernelhub.from_pretrained(smollm2_gguf(), dequantize=False, dtype=torch.bfloat16)
    assert nbytes(small) <= 150e6  # packed projections (~66 MB) plus the bf16 embedding (~57 MB)


def test_user_kernels_choose_the_reference(packed, prompts):
    ref = kernelhub.from_pretrained(smollm2_gguf(), dequantize=False, kernels={"QuantizedLinear": "reference"})
    entries = [e for e in ref.binding if "QuantizedLinear" in e.source]
    assert entries and all(e.chosen == "reference" and "Q4_1" in e.note for e in entries)
    with torch.no_grad():
        ours, theirs = packed(prompts[0]).logits, ref(prompts[0]).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()


def test_dequantize_false_needs_a_gguf_file(tmp_path):
    with pytest.raises(KernelhubError, match="not a .gguf file"):
        kernelhub.from_pretrained(tmp_path, dequantize=False)


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
    fused, notes = _fuse(Model(), mixed)
    assert not fused and "l.qkv.weight dequantised" in notes[0] and "Q4_1, Q8_0" in notes[0]


def test_a_users_quantized_linear_request_wins():
    assert with_packed_kernels(None, None) == {"QuantizedLinear": ["gguf", "reference"]}
    assert with_packed_kernels({"RMSNorm": "reference"}, {"RMSNorm": "reference"}) == {
        "RMSNorm": "reference", "QuantizedLinear": ["gguf", "reference"]}
    assert with_packed_kernels({"QuantizedLinear": "reference"}, {"QuantizedLinear": "reference"}) == {
        "QuantizedLinear": "reference"}
