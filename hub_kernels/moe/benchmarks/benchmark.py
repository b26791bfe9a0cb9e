"""`kernels benchmark` workloads: the kernel vs the PyTorch reference loop it replaces."""

import torch

from kernels.benchmark import Benchmark


class MoEBenchmark(Benchmark):
    seed = 0

    def _setup(self, tokens, experts, top_k, hidden, inter):
        dtype = torch.bfloat16 if self.device != "cpu" else torch.float32
        g = torch.Generator(device=self.device).manual_seed(self.seed)
        self.x = torch.randn(tokens, hidden, device=self.device, dtype=dtype, generator=g)
        self.gate_up = torch.randn(experts, 2 * inter, hidden, device=self.device, dtype=dtype, generator=g) / 32
        self.down = torch.randn(experts, hidden, inter, device=self.device, dtype=dtype, generator=g) / 32
        logits = torch.randn(tokens, experts, device=self.device, generator=g)
        weights, self.idx = logits.softmax(-1).topk(top_k, dim=-1)
        self.w = weights.to(dtype)
        self.out = torch.empty_like(self.x)

    def _verify(self):
        return self.kernel.reference_experts(self.x, self.idx, self.w, self.gate_up, self.down)

    def setup_decode(self):
        self._setup(8, 64, 8, 1024, 256)

    def benchmark_decode(self):
        self.out = self.kernel.moe_experts(self.x, self.idx, self.w, self.gate_up, self.down)

    def verify_decode(self):
        return self._verify()

    def setup_prefill(self):
        self._setup(1024, 64, 8, 1024, 256)

    def benchmark_prefill(self):
        self.out = self.kernel.moe_experts(self.x, self.idx, self.w, self.gate_up, self.down)

    def verify_prefill(self):
        return self._verify()
