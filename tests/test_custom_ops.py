"""Every kernel in hub_kernels/ is a `torch.library` custom op: opcheck passes (Triton under the
interpreter on CPU, tiny shapes), namespaces never collide, a second import registers nothing,
the layers declare `can_torch_compile`, and compile-mode binding refuses kernels that do not."""

import importlib.util
import shutil
import sys

import pytest
import torch

import kernelhub
from tests.hub_test_kernels import HUB_KERNELS
from tests.unchanged import refused

PACKAGES = {"rmsnorm": "rmsnorm", "silu-and-mul": "silu_and_mul", "layernorm": "layernorm", "rotary": "rotary",
            "flash-attention": "flash_attention"}


def load(source_dir, module_name):
    """Import a kernel's torch-ext package under `module_name`, as kernelhub imports Hub kernels."""
    init = source_dir / "__init__.py"
    spec = importlib.util.spec_from_file_location(module_name, init, submodule_search_locations=[str(source_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kernels():
    return {name: load(HUB_KERNELS / name / "torch-ext" / package, f"_custom_ops_test_{package}")
            for name, package in PACKAGES.items()}


def ops(module):
    return getattr(torch.ops, module._ops.NAMESPACE)


def test_rmsnorm_forward_and_backward_pass_opcheck(kernels):
    rms = ops(kernels["rmsnorm"])
    x, w = torch.randn(3, 8, requires_grad=True), (torch.rand(8) + 0.5).requires_grad_()
    torch.library.opcheck(rms.forward, (x, w, 1e-6))
    y, rstd = rms.forward(x.detach(), w.detach(), 1e-6)
    torch.library.opcheck(rms.backward, (torch.randn(3, 8), x.detach(), w.detach(), rstd))


def test_silu_and_mul_forward_and_backward_pass_opcheck(kernels):
    silu = ops(kernels["silu-and-mul"])
    x = torch.randn(3, 8, requires_grad=True)
    torch.library.opcheck(silu.forward, (x,))
    torch.library.opcheck(silu.backward, (torch.randn(3, 4), x.detach()))


def test_forward_only_ops_pass_opcheck(kernels):
    ln = ops(kernels["layernorm"])
    x, w, b = torch.randn(3, 8), torch.rand(8) + 0.5, torch.randn(8)
    torch.library.opcheck(ln.forward, (x, w, b, 1e-5))
    torch.library.opcheck(ln.forward, (x, w, None, 1e-5))
    angles = torch.randn(1, 3, 4)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    torch.library.opcheck(ops(kernels["rotary"]).forward, (torch.randn(1, 3, 2, 8).transpose(1, 2), cos, sin))
    q, k = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    torch.library.opcheck(ops(kernels["flash-attention"]).forward,
                          (q, k, torch.randn(5, 1, 16), cu, cu, None, None, None, 3, 0.25, 0.0, -1, 0))


def test_moe_experts_passes_opcheck():
    moe = load(HUB_KERNELS / "moe" / "torch-ext" / "moe", "_custom_ops_test_moe")
    assert moe._ops.NAMESPACE.startswith("moe_") and moe.layers.Experts.can_torch_compile is True
    g = torch.Generator().manual_seed(0)
    x, weights = torch.randn(5, 16, generator=g), torch.rand(5, 2, generator=g)
    index = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2]])
    gate_up, down = torch.randn(4, 32, 16, generator=g) / 4, torch.randn(4, 16, 16, generator=g) / 4
    torch.library.opcheck(ops(moe).experts, (x, index, weights, gate_up, down, None, None, "silu", 1.702, 7.0))


def test_the_public_functions_run_through_the_ops_and_match_the_references(kernels):
    rms, silu = kernels["rmsnorm"], kernels["silu-and-mul"]
    x, w = torch.randn(2, 3, 8), torch.rand(8) + 0.5
    graph = torch.fx.experimental.proxy_tensor.make_fx(lambda x, w: rms.rms_norm(x, w, 1e-6))(x, w)
    assert f"{rms._ops.NAMESPACE}.forward" in str(graph.code)  # the op, not the Triton launch, is traced
    torch.testing.assert_close(rms.rms_norm(x, w, 1e-6), rms.reference_rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(silu.silu_and_mul(x), silu.reference_silu_and_mul(x), atol=1e-6, rtol=1e-6)


def test_namespaces_are_per_kernel_and_per_source(kernels, tmp_path):
    namespaces = {name: module._ops.NAMESPACE for name, module in kernels.items()}
    assert len(set(namespaces.values())) == len(namespaces)
    assert all(ns.startswith(PACKAGES[name] + "_") for name, ns in namespaces.items())
    # the same bytes under another module name: the same namespace, registered once, not twice
    again = load(HUB_KERNELS / "rmsnorm" / "torch-ext" / "rmsnorm", "_custom_ops_test_rmsnorm_again")
    assert again._ops is not kernels["rmsnorm"]._ops and again._ops.NAMESPACE == namespaces["rmsnorm"]
    # other bytes (another version of the kernel): another namespace, both ops live side by side
    changed = tmp_path / "rmsnorm"
    shutil.copytree(HUB_KERNELS / "rmsnorm" / "torch-ext" / "rmsnorm", changed)
    ops_file = changed / "_ops.py"
    ops_file.write_text(ops_file.read_text() + "\n# version 2\n")
    v2 = load(changed, "_custom_ops_test_rmsnorm_v2")
    assert v2._ops.NAMESPACE != namespaces["rmsnorm"]
    x, w = torch.randn(2, 8), torch.rand(8) + 0.5
    torch.testing.assert_close(ops(v2).forward(x, w, 1e-6)[0], ops(again).forward(x, w, 1e-6)[0])


def test_every_layer_declares_that_it_compiles(kernels):
    layers = [(name, cls) for module in kernels.values() if hasattr(module, "layers")
              for name, cls in vars(module.layers).items()
              if isinstance(cls, type) and cls.__module__.endswith("layers")]
    assert sorted(name for name, _ in layers) == ["ApplyRotary", "LayerNorm", "RMSNorm", "SiLUAndMul"]
    assert all(cls.can_torch_compile is True for _, cls in layers)


class EagerOnlyRMSNorm(torch.nn.Module):
    """An in-process RMSNorm kernel that declares it cannot run under torch.compile."""

    can_torch_compile = False

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def test_compile_mode_refuses_a_kernel_that_cannot_compile_and_a_chain_falls_back(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    refused(model, kernelhub.BindError, ["EagerOnlyRMSNorm", "can_torch_compile=False, cannot run under torch.compile"],
            attn="sdpa", kernels={"RMSNorm": EagerOnlyRMSNorm}, mode="compile")
    local = f"{HUB_KERNELS / 'rmsnorm'}:RMSNorm"
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": [EagerOnlyRMSNorm, local]}, mode="compile")
    norm = next(e for e in plan.entries if e.path.endswith("input_layernorm"))
    assert norm.chosen.endswith("rmsnorm:RMSNorm"), norm
    assert norm.rejected == (("EagerOnlyRMSNorm", ("can_torch_compile=False, cannot run under torch.compile",)),)
    plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": EagerOnlyRMSNorm})  # outside compile mode it binds
    assert next(e for e in plan.entries if e.path.endswith("input_layernorm")).chosen == "EagerOnlyRMSNorm"
