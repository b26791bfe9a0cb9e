"""`kernels benchmark` workloads: the kernel vs torch's scaled_dot_product_attention."""

import torch
import torch.nn.functional as F

from kernels.benchmark import Benchmark


class FlashAttentionBenchmark(Benchmark):
    seed = 0

    def _setup(self, batch, seq, heads, kv_heads, head_dim):
        dtype = torch.bfloat16 if self.device != "cpu" else torch.float32
        self.q = torch.randn(batch, seq, heads, head_dim, device=self.device, dtype=dtype)
        self.k = torch.randn(batch, seq, kv_heads, head_dim, device=self.device, dtype=dtype)
        self.v = torch.randn(batch, seq, kv_heads, head_dim, device=self.device, dtype=dtype)

    def _verify(self):
        q, k, v = (t.transpose(1, 2) for t in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)

    def setup_small(self):
        self._setup(1, 128, 8, 2, 64)

    def benchmark_small(self):
        self.out = self.kernel.flash_attn_func(self.q, self.k, self.v, causal=True)

    def verify_small(self):
        return self._verify()

    def setup_large(self):
        self._setup(4, 2048, 32, 8, 128)

    def benchmark_large(self):
        self.out = self.kernel.flash_attn_func(self.q, self.k, self.v, causal=True)

    def verify_large(self):
        return self._verify()
