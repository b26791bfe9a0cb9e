"""`kernels benchmark` workloads: decode-sized and prefill-sized products with Q8_0 weights."""

import torch

from kernels.benchmark import Benchmark


def q8_0_blocks(rows, cols, seed=0):
    """Random Q8_0 blocks (an fp16 scale, then 32 int8 values) and the float32 matrix they hold."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, cols // 32, 1, generator=gen) * 1e-2 + 1e-3
    q = torch.randint(-127, 128, (rows, cols // 32, 32), generator=gen, dtype=torch.int8)
    blocks = torch.cat([scale.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=-1)
    values = scale.to(torch.float16).float() * q.float()
    return blocks.reshape(rows, -1), values.reshape(rows, cols)


class MulMatVecBenchmark(Benchmark):
    seed = 0

    def _setup(self, tokens, out_features, in_features):
        blocks, values = q8_0_blocks(out_features, in_features)
        self.weight, self.values = blocks.to(self.device), values.to(self.device)
        self.x = torch.randn(tokens, in_features, device=self.device)
        self.out_features = out_features
        self.out = torch.empty(tokens, out_features, device=self.device)

    def _verify(self):
        return self.x @ self.values.T

    def setup_small(self):
        self._setup(1, 256, 1024)

    def benchmark_small(self):
        self.out = self.kernel.mul_mat_vec(self.weight, self.x, 8, self.out_features)

    def verify_small(self):
        return self._verify()

    def setup_large(self):
        self._setup(128, 4096, 4096)

    def benchmark_large(self):
        self.out = self.kernel.mul_mat_vec(self.weight, self.x, 8, self.out_features)

    def verify_large(self):
        return self._verify()
