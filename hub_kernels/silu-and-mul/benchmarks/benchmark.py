"""`kernels benchmark` workloads: the kernel vs the PyTorch reference it replaces."""

import torch

from kernels.benchmark import Benchmark


class SiLUAndMulBenchmark(Benchmark):
    seed = 0

    def _setup(self, rows, d):
        dtype = torch.bfloat16 if self.device != "cpu" else torch.float32
        self.x = torch.randn(rows, 2 * d, device=self.device, dtype=dtype)
        self.out = torch.empty(rows, d, device=self.device, dtype=dtype)

    def _verify(self):
        d = self.x.shape[-1] // 2
        return torch.nn.functional.silu(self.x[..., :d]) * self.x[..., d:]

    def setup_small(self):
        self._setup(64, 1536)

    def benchmark_small(self):
        self.out = self.kernel.silu_and_mul(self.x)

    def verify_small(self):
        return self._verify()

    def setup_large(self):
        self._setup(4096, 11008)

    def benchmark_large(self):
        self.out = self.kernel.silu_and_mul(self.x)

    def verify_large(self):
        return self._verify()
