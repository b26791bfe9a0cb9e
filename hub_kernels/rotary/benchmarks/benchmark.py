"""`kernels benchmark` workloads: the kernel vs the PyTorch reference it replaces."""

import torch

from kernels.benchmark import Benchmark


class RotaryBenchmark(Benchmark):
    seed = 0

    def _setup(self, batch, seq, heads, kv_heads, head_dim):
        dtype = torch.bfloat16 if self.device != "cpu" else torch.float32
        self.q = torch.randn(batch, seq, heads, head_dim, device=self.device, dtype=dtype).transpose(1, 2)
        self.k = torch.randn(batch, seq, kv_heads, head_dim, device=self.device, dtype=dtype).transpose(1, 2)
        angles = torch.randn(batch, seq, head_dim // 2, device=self.device)
        self.cos = torch.cat([angles.cos()] * 2, -1).to(dtype)
        self.sin = torch.cat([angles.sin()] * 2, -1).to(dtype)

    def _verify(self):
        half = self.q.shape[-1] // 2
        q = self.q
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        return q * self.cos[:, None] + rotated * self.sin[:, None]

    def setup_small(self):
        self._setup(1, 128, 9, 3, 64)

    def benchmark_small(self):
        self.out = self.kernel.apply_rotary(self.q, self.k, self.cos, self.sin)[0]

    def verify_small(self):
        return self._verify()

    def setup_large(self):
        self._setup(8, 2048, 32, 8, 128)

    def benchmark_large(self):
        self.out = self.kernel.apply_rotary(self.q, self.k, self.cos, self.sin)[0]

    def verify_large(self):
        return self._verify()
