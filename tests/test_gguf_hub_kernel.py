"""A Hub kernel with transformers' GGUF kernel API (`mul_mat_vec`, `dequantize`, `get_rows`) bound as
`QuantizedLinear` and `QuantizedEmbedding` through trust, the lock and conformance, served by the
loopback Hub."""

import json
import shutil

import pytest
import torch

import kernelhub
from kernelhub.cli.commands import main
from kernelhub.declare.errors import LockError
from kernelhub.kernel.build import build_kernel
from kernelhub.registry.hub.ggml_api import ggml_conformance
from kernelhub.registry.hub.loader import forget_loaded
from kernelhub.registry.hub.trust import UntrustedKernelError
from kernelhub.testing import write_kernel_repo
from tests.hub_test_kernels import HUB_KERNELS, ORG
from tests.unchanged import refused

OURS = f"{ORG}/ggml-quantization"  # hub_kernels/gguf, published under transformers' repo name


def write_quantized_gguf(path, seed=0):
    """A 1-layer llama GGUF (hidden 64, ff 128) whose projections are Q8_0, Q4_0, Q4_1 and Q5_0 blocks."""
    from gguf import GGMLQuantizationType as T

    from tests.gguf_files import write_tiny_gguf

    types = {"token_embd.weight": T.Q8_0, "blk.0.attn_q.weight": T.Q8_0, "blk.0.attn_k.weight": T.Q8_0,
             "blk.0.attn_v.weight": T.Q8_0, "blk.0.attn_output.weight": T.Q4_0, "blk.0.ffn_gate.weight": T.Q4_1,
             "blk.0.ffn_up.weight": T.Q4_1, "blk.0.ffn_down.weight": T.Q5_0}
    return write_tiny_gguf(path, hidden=64, seed=seed, types=types)


# transformers' API, returning numbers 1% too large: written into a kernel repo by their source
def mul_mat_vec(weight, x, ggml_type, out_features):
    from kernelhub.backends.gguf_quant import mul_mat_eager

    return mul_mat_eager(weight, x, ggml_type, out_features) * 1.01


def dequantize(weight, ggml_type, rows, cols, dtype):
    from kernelhub.backends.gguf_quant import dequantize_eager

    return dequantize_eager(weight, ggml_type, rows, cols, dtype) * 1.01


def get_rows(weight, indices, ggml_type, cols, dtype):
    from kernelhub.backends.gguf_quant import get_rows_eager

    return get_rows_eager(weight, indices, ggml_type, cols, dtype) * 1.01


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_quantized_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def published(loopback_hub, tmp_path_factory):
    """hub_kernels/gguf and a 1%-off kernel with the same API, on the loopback Hub: repo name -> commit."""
    root = tmp_path_factory.mktemp("ggml-sources")
    ours = shutil.copytree(HUB_KERNELS / "gguf", root / "gguf", ignore=shutil.ignore_patterns("build", "__pycache__"))
    build_kernel(ours)
    bad = write_kernel_repo(root / "ggml-bad", "ggml-bad", functions=[mul_mat_vec, dequantize, get_rows])
    return {"ours": loopback_hub.publish(OURS, ours), "bad": loopback_hub.publish(f"{ORG}/ggml-bad", bad)}


@pytest.fixture
def packed(tiny_gguf):
    model = kernelhub.from_pretrained(tiny_gguf, dequantize=False)
    assert {e.chosen for e in model.binding if "QuantizedLinear" in e.source} == {"gguf"}
    return model


def _quantized(plan):
    return [e for e in plan.entries if "(QuantizedLinear)" in e.source]


def test_our_hub_kernel_binds_as_quantized_linear_and_matches_the_builtin_kernel(hub, published, packed):
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4]])  # 11 rows: the dequantize path
    with torch.no_grad():
        builtin, builtin_one = packed(prompt).logits, packed(prompt[:, :1]).logits
    builtin_tokens = packed.generate(prompt, max_new_tokens=6, eos_token_id=None)  # 1 row: mul_mat_vec
    plan = kernelhub.bind(packed, kernels={"QuantizedLinear": f"{OURS}@v1"})
    entries = _quantized(plan)
    assert len(entries) == 5  # qkv, o, gate_up, down, the untied lm_head
    assert {e.source for e in entries} == {f"hub {OURS}@{published['ours']} (QuantizedLinear)"}
    assert all(e.chosen == f"{OURS}@v1:QuantizedLinear" and "max err" in e.note for e in entries)
    assert {e.note.split(";")[0] for e in entries} == {"Q8_0", "Q4_0", "Q4_1", "Q5_0"}
    with torch.no_grad():
        torch.testing.assert_close(packed(prompt).logits, builtin, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(prompt[:, :1]).logits, builtin_one, atol=1e-5, rtol=1e-5)
    assert packed.generate(prompt, max_new_tokens=6, eos_token_id=None).tolist() == builtin_tokens.tolist()


def test_an_untrusted_org_is_refused_before_its_code_runs(hub, packed, tmp_path, marker, monkeypatch):
    evil = write_kernel_repo(tmp_path / "evil", "ggml-evil", functions=[mul_mat_vec, dequantize, get_rows],
                             init_source=f"open({str(marker)!r}, 'w').write('ran')\n")
    hub.publish("stranger/ggml-quantization", evil)
    message = refused(packed, UntrustedKernelError, ["'stranger/ggml-quantization' is not trusted",
                                                     "KERNELHUB_TRUSTED=stranger"],
                      marker=marker, kernels={"QuantizedLinear": ["stranger/ggml-quantization@v1", "gguf"]})
    assert "none of its code was downloaded or imported" in message


def test_a_lock_mismatch_is_refused_before_import(hub, published, packed, tmp_path, marker):
    lock = tmp_path / "kernelhub.lock"
    assert main(["lock", f"{OURS}@v1", "-o", str(lock)]) == 0
    files = json.loads(lock.read_text())["kernels"][f"{OURS}@v1"]["variants"]["torch-cpu"]["files"]
    assert {"gguf/__init__.py", "gguf/_ops.py", "gguf/_blocks.py"} <= set(files)
    forget_loaded()
    target = next((tmp_path / "hf-cache").glob("kernels--*/snapshots/*/build/torch-cpu/gguf/_ops.py"))
    source = target.read_text()
    target.unlink()  # a cache entry is a link into the blob store: replace the file, not the blob
    target.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + source)
    refused(packed, LockError, ["gguf/_ops.py"], marker=marker, kernels={"QuantizedLinear": f"{OURS}@v1"},
            lock=lock)


def test_wrong_numbers_are_a_recorded_conformance_rejection_and_fall_back(hub, published, packed):
    plan = kernelhub.bind(packed, kernels={"QuantizedLinear": [f"{ORG}/ggml-bad@v1", "gguf"]})
    entries = _quantized(plan)
    assert entries and all(e.chosen == "gguf" for e in entries)
    for entry in entries:
        (name, reasons), = entry.rejected
        assert name == f"{ORG}/ggml-bad@v1:QuantizedLinear"
        assert reasons[0].startswith("conformance: max error ") and "QuantizedLinear's reference" in reasons[0]
        measured = float(reasons[0].removeprefix("conformance: max error ").split()[0])
        assert 0.005 < measured <= 0.0101  # 1% too large, relative to the largest reference output
    with pytest.raises(kernelhub.KernelhubError, match="conformance: max error"):
        kernelhub.bind(packed, kernels={"QuantizedLinear": f"{ORG}/ggml-bad@v1"})


def test_the_api_serves_the_embedding_through_get_rows(hub, published, packed):
    """`get_rows` serves QuantizedEmbedding: ours gives the built-in kernel's logits; one 1% off is a
    recorded conformance rejection and the chain falls back."""
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        builtin = packed(prompt).logits
    plan = kernelhub.bind(packed, kernels={"QuantizedEmbedding": f"{OURS}@v1"})
    embedding = plan["model.embed_tokens"]
    assert embedding.chosen == f"{OURS}@v1:QuantizedEmbedding" and embedding.note.startswith("Q8_0")
    with torch.no_grad():
        assert torch.equal(packed(prompt).logits, builtin)
    plan = kernelhub.bind(packed, kernels={"QuantizedEmbedding": [f"{ORG}/ggml-bad@v1", "gguf"]})
    embedding = plan["model.embed_tokens"]
    (name, reasons), = embedding.rejected
    assert embedding.chosen == "gguf" and name == f"{ORG}/ggml-bad@v1:QuantizedEmbedding"
    assert reasons[0].startswith("conformance: max error ") and "QuantizedEmbedding's reference" in reasons[0]


def test_a_later_bind_silent_on_the_packed_layers_keeps_their_kernels(packed):
    """from_pretrained binds the packed layers to `gguf`; a bind naming only other layers keeps that (the
    reference would unpack a whole weight at every call), and one naming them is obeyed."""
    plan = kernelhub.bind(packed, kernels={"RMSNorm": "reference"})
    assert {e.chosen for e in plan if "(Quantized" in e.source} == {"gguf"}
    plan = kernelhub.bind(packed, kernels={"QuantizedLinear": "reference"})
    assert {e.chosen for e in _quantized(plan)} == {"reference"} and plan["model.embed_tokens"].chosen == "gguf"


def test_the_api_serves_only_the_packed_layers(hub, published, tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    plan = kernelhub.bind(model, kernels={"RMSNorm": [f"{OURS}@v1", "reference"]})
    norm = next(e for e in plan.entries if e.path.endswith("input_layernorm"))
    assert norm.chosen == "reference"
    assert "serves only the QuantizedLinear and QuantizedEmbedding layers, not 'RMSNorm'" in norm.rejected[0][1][0]


def test_kernel_check_numbers_for_our_repo():
    from kernels import get_local_kernel

    module = get_local_kernel(HUB_KERNELS / "gguf", backend="cpu")
    lines, problems = ggml_conformance(module)
    assert not problems and len(lines) == 8
    assert sum("conforms to kernelhub QuantizedLinear" in x for x in lines) == 4
    assert sum("conforms to kernelhub QuantizedEmbedding" in x for x in lines) == 4
