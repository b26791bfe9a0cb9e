"""The pytest plugin: its fixtures used for real, and the plugin itself tested with pytester."""

import pytest
import torch

import kernelhub
from kernelhub.declare.eager import eager_attention

pytest_plugins = ["pytester"]


IDS = torch.tensor([[2, 7, 1, 8, 2, 8]])


@pytest.mark.kernelhub_backends
def test_every_available_backend_matches_eager(attn_backend, tiny_checkpoint, assert_bound):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation=attn_backend)
    assert_bound(model, "model.layers.0.self_attn.attn", attn_backend)
    reference = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, atol=1e-5, rtol=1e-5)


def test_swap_layer_kernel(swap_kernel, tiny_checkpoint, assert_bound):
    class Zero(torch.nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    swap_kernel("RMSNorm", Zero)
    model = kernelhub.from_pretrained(tiny_checkpoint)
    assert_bound(model, "model.norm", Zero)
    assert model.binding["model.norm"].source == "swap_kernel (RMSNorm)"
    with torch.no_grad():
        assert model(IDS).logits.abs().max() == 0


def test_swap_attention_backend(swap_kernel, tiny_checkpoint):
    calls = []

    def spy(module, q, k, v, mask, **kw):
        calls.append(module.layer_idx)
        return eager_attention(module, q, k, v, mask, **kw)

    swap_kernel("sdpa", spy)
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="scaled_dot_product")  # aliases follow
    model(IDS)
    assert calls == [0, 1, 2, 3]
    assert model.binding.entries[0].source == "swap_kernel"


def test_swap_restores_after_the_test(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint)
    assert model.binding["model.norm"].chosen == "reference"
    assert kernelhub.get_registry().get("sdpa").backend.fn.__name__ == "sdpa_attention"


def test_swap_kernel_bad_input(swap_kernel):
    with pytest.raises(kernelhub.KernelhubError, match="'RMSNrom' is neither .* Did you mean 'RMSNorm'"):
        swap_kernel("RMSNrom", object)
    with pytest.raises(kernelhub.KernelhubError, match="breaks the layer contract"):
        swap_kernel("RMSNorm", lambda x: x)
    with pytest.raises(kernelhub.KernelhubError, match="not an attention function"):
        swap_kernel("sdpa", 42)


def test_plugin_in_a_fresh_pytest_run(pytester, monkeypatch):
    """The plugin loads through its pytest11 entry point and reports each backend left out."""
    pytester.makepyfile(
        """
        import pytest, kernelhub

        @pytest.mark.kernelhub_backends
        def test_backend(attn_backend):
            assert attn_backend in ("eager", "sdpa", "flex", "flash", "needs_cuda")

        def test_assert_bound_message(assert_bound):
            class M: binding = None
            with pytest.raises(AssertionError, match="not bound"):
                assert_bound(M(), "x", "sdpa")
        """
    )
    pytester.makeconftest(
        """
        import kernelhub
        from kernelhub.declare.eager import eager_attention
        from kernelhub.registry import builtins

        class CudaOnly:
            @kernelhub.hookimpl
            def kernelhub_attention_backends(self):
                return [kernelhub.AttentionBackend("needs_cuda", eager_attention, mask_format="bool",
                        capabilities=kernelhub.Capabilities(devices=("cuda",)))]

        def pytest_configure(config):
            import kernelhub.registry.plugins as m
            original = m.Registry.__init__
            def init(self, *a, **k):
                original(self, *a, **k)
                self.add_plugin(CudaOnly(), "cuda-only")
            m.Registry.__init__ = init
        """
    )
    monkeypatch.delenv("TRITON_INTERPRET")  # a plain CPU machine: flash cannot run either
    result = pytester.runpytest_subprocess("-rs")  # in a child: the conftest patches kernelhub
    result.assert_outcomes(passed=4, skipped=2)
    result.stdout.fnmatch_lines(["*needs_cuda: runs on cuda, not cpu*"])
    result.stdout.fnmatch_lines(["*flash: flash needs CUDA*"])


def test_hub_fixtures_in_a_fresh_pytest_run(pytester):
    """hub_kernel_repo + offline_hub_cache: define a kernel, cache it, bind it by Hub ref offline."""
    pytester.makepyfile(
        """
        import socket
        import torch, kernelhub
        from kernelhub.models.llama import LlamaForCausalLM

        def test_cached_kernel_binds_offline(hub_kernel_repo, offline_hub_cache, monkeypatch):
            class RMSNorm(torch.nn.Module):
                def forward(self, x):
                    return 3 * x

            commit = offline_hub_cache("my-org/triple", hub_kernel_repo("triple", layers=[RMSNorm]))
            monkeypatch.setattr(socket.socket, "connect", lambda *a: 1 / 0)  # no request may leave
            model = LlamaForCausalLM({"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                                      "num_hidden_layers": 1, "num_attention_heads": 2})
            plan = kernelhub.bind(model, "sdpa", kernels={"RMSNorm": "my-org/triple@v1"}, verify=False)
            assert plan["model.norm"].source == f"hub my-org/triple@{commit} (RMSNorm)"
            assert torch.equal(model.model.norm(torch.ones(2)), torch.full((2,), 3.0))
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


def test_swap_kernel_takes_a_local_kernel_directory(swap_kernel, tiny_checkpoint, tmp_path):
    from kernelhub.testing import write_kernel_repo

    doubled = ("class RMSNorm(torch.nn.Module):\n"
               "    def forward(self, x):\n"
               "        x32 = x.float()\n"
               "        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)\n"
               "        return 2 * self.weight * out.to(x.dtype)\n")
    repo = write_kernel_repo(tmp_path / "doubled-norm", "rmsnorm", layers=[doubled])
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        reference = kernelhub.from_pretrained(tiny_checkpoint)(ids).logits
        swap_kernel("RMSNorm", repo)
        model = kernelhub.from_pretrained(tiny_checkpoint)
        assert model.binding["model.norm"].source.startswith("swap_kernel")
        assert (model(ids).logits - reference).abs().max() > 1e-2
    with pytest.raises(kernelhub.KernelhubError, match="no such kernel directory"):
        swap_kernel("RMSNorm", tmp_path / "missing")


def test_assert_bound_names_the_closest_paths_and_tiny_model_is_bound(tiny_model, assert_bound):
    assert_bound(tiny_model, "model.norm", "reference")
    with pytest.raises(AssertionError, match="'model.nrom' is not a bound site or layer of LlamaForCausalLM; "
                                             "closest: model.norm"):
        assert_bound(tiny_model, "model.nrom", "reference")
