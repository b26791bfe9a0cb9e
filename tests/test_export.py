"""`torch.export` of a bound model's decode step over a static cache: Hub kernels appear in the
graph as their custom ops, and the exported steps give eager's logits and cache writes."""

import pytest
import torch

import kernelhub
from kernelhub.runtime.compiled_decode import decode_step
from kernelhub.runtime.export import export_decode_step
from tests.hub_test_kernels import HUB_KERNELS

KERNELS = {"RMSNorm": f"{HUB_KERNELS / 'rmsnorm'}", "SiLUAndMul": f"{HUB_KERNELS / 'silu-and-mul'}",
           "ApplyRotary": f"{HUB_KERNELS / 'rotary'}"}


@pytest.mark.parametrize("attn", ["sdpa", "flex"])
def test_exported_decode_steps_match_eager_with_hub_kernels_in_the_graph(tiny_checkpoint, attn):
    exported_model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation=attn, kernels=KERNELS,
                                               mode="compile")
    eager_model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation=attn, kernels=KERNELS)
    exported_cache, eager_cache = (m.make_cache("static", batch=2, max_len=12) for m in (exported_model, eager_model))
    prompt = torch.tensor([[5, 9, 2, 7], [0, 0, 3, 8]])
    padding = torch.nn.functional.pad(torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), (0, 8), value=1)
    positions = torch.tensor([[3], [1]])
    with torch.no_grad():
        for model, cache in ((exported_model, exported_cache), (eager_model, eager_cache)):
            model(prompt, attention_mask=padding[:, :4], position_ids=(padding[:, :4].cumsum(-1) - 1).clamp(min=0),
                  cache=cache)
    program = export_decode_step(exported_model, exported_cache)
    code = program.graph_module.code
    for kernel in ("rmsnorm", "silu_and_mul", "rotary"):
        assert f"torch.ops.{kernel}_" in code, f"{kernel} is not in the exported graph as its custom op"
    step = program.module()
    token = torch.tensor([[11], [4]])
    with torch.no_grad():
        for seen in range(4, 8):  # one program for every position
            positions = positions + 1
            got = step(token, positions, padding, torch.tensor(seen))
            want = decode_step(eager_model, token, positions, padding, eager_cache)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            token = want.argmax(-1, keepdim=True)
    for got_k, want_k in zip(exported_cache.keys, eager_cache.keys):  # the program wrote the model's cache
        torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
    assert exported_cache.keys[0][:, :, 7].abs().sum() > 0 and exported_cache.keys[0][:, :, 8:].abs().sum() == 0
