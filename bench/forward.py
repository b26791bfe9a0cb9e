"""Forward latency: kernelhub vs transformers 5.22.2 on the same checkpoint and inputs.

    .venv/bin/python bench/forward.py            # or: make bench

Prints ratios from one run (kernelhub time / transformers time; below 1.00 is faster),
and the binding overhead against the same model with sdpa hard-wired into every site.
Checkpoints are random weights in the Hugging Face layout, written by transformers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import kernelhub

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192)


def write_checkpoint(config, path):
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).save_pretrained(path)


def interleaved(a, b, repeat, warmup=2):
    """Median seconds of `a` and of `b`, run alternately so load drift hits both alike."""
    for _ in range(warmup):
        a(), b()
    times_a, times_b = [], []
    for _ in range(repeat):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def hardwire_sdpa(model):
    """Replace every site's forward with a direct causal sdpa call: no binding indirection at all."""
    for site in model.modules():
        if isinstance(site, kernelhub.AttentionSite):
            def forward(q, k, v, mask, site=site):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=site.scaling,
                                                     enable_gqa=q.shape[1] != k.shape[1])
                return out.transpose(1, 2), None
            site.forward = forward
    return model


def bench_config(name, config, batch, seq, repeat):
    import transformers

    rows = []
    with tempfile.TemporaryDirectory() as path, torch.inference_mode():
        write_checkpoint(config, path)
        ids = torch.randint(0, config["vocab_size"], (batch, seq))
        for backend, hf_backend, kernels in [("eager", "eager", None), ("sdpa", "sdpa", None),
                                             ("flex", "flex_attention", None),
                                             ("sdpa+onednn", "sdpa", {"Linear": "onednn"})]:
            ours = kernelhub.from_pretrained(path, attn_implementation=backend.split("+")[0], kernels=kernels,
                                             dtype="float32")
            theirs = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=hf_backend,
                                                                       dtype=torch.float32).eval()
            diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
            t_ours, t_theirs = interleaved(lambda ours=ours: ours(ids), lambda theirs=theirs: theirs(ids), repeat)
            rows.append((name, backend, t_ours, t_theirs, diff))
        bound = kernelhub.from_pretrained(path, attn_implementation="sdpa", dtype="float32")
        wired = hardwire_sdpa(kernelhub.from_pretrained(path, attn_implementation="sdpa", dtype="float32"))
        # Measured on a short input, where a fixed per-forward cost shows most.
        short = ids[:1, :16]
        t_bound, t_wired = interleaved(lambda: bound(short), lambda: wired(short), 10 * repeat)
        overhead = (t_bound / t_wired - 1, (t_bound - t_wired) * 1e6)
    return rows, overhead


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU\n")
    print(f"{'model':14s} {'backend':12s} {'kernelhub ms':>12s} {'transformers ms':>16s} {'ratio':>6s} "
          f"{'max|dlogits|':>12s}")
    for name, config, batch, seq in [("tiny", TINY, 4, 128), ("smollm2-135m", SMOLLM2_135M, 1, 128)]:
        rows, overhead = bench_config(name, config, batch, seq, args.repeat)
        for model, backend, ours, theirs, diff in rows:
            print(f"{model:14s} {backend:12s} {ours * 1e3:12.2f} {theirs * 1e3:16.2f} {ours / theirs:6.2f} "
                  f"{diff:12.1e}")
        print(f"{name:14s} binding overhead vs hard-wired sdpa (1x16 tokens): {overhead[0] * 100:+.1f}% "
              f"({overhead[1]:+.0f} us per forward)\n")


if __name__ == "__main__":
    main()
