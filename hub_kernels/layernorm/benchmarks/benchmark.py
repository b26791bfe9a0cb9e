"""`kernels benchmark` workloads: the kernel vs the PyTorch reference it replaces."""

import torch

from kernels.benchmark import Benchmark


class LayerNormBenchmark(Benchmark):
    seed = 0
    eps = 1e-12

    def _setup(self, rows, hidden):
        dtype = torch.bfloat16 if self.device != "cpu" else torch.float32
        self.x = torch.randn(rows, hidden, device=self.device, dtype=dtype)
        self.weight = torch.rand(hidden, device=self.device, dtype=dtype) + 0.5
        self.bias = torch.randn(hidden, device=self.device, dtype=dtype)
        self.out = torch.empty_like(self.x)

    def _verify(self):
        return torch.nn.functional.layer_norm(self.x, self.x.shape[-1:], self.weight, self.bias, self.eps)

    def setup_small(self):
        self._setup(64, 384)

    def benchmark_small(self):
        self.out = self.kernel.layer_norm(self.x, self.weight, self.bias, self.eps)

    def verify_small(self):
        return self._verify()

    def setup_large(self):
        self._setup(4096, 4096)

    def benchmark_large(self):
        self.out = self.kernel.layer_norm(self.x, self.weight, self.bias, self.eps)

    def verify_large(self):
        return self._verify()
