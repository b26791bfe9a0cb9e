"""Continuous batching throughput: kernelhub `generate_batch` vs transformers 5.22.2.

    .venv/bin/python bench/batching.py               # CPU: tiny Llama and SmolLM2, vs transformers
    python3 bench/batching.py --device cuda --gpu    # GPU: flash vs sdpa on a SmolLM2-shaped model

The same greedy workload goes through
- transformers `generate_batch` (continuous batching; its best of a few small configs, no warmup),
- transformers `generate` on one left-padded batch (the usual way to batch without a server),
- kernelhub `generate_batch` (paged cache, packed steps), with its default kernels and with the
  oneDNN Linear kernel bound (`kernels={"Linear": "onednn"}`).

Workloads: 8 prompts x 128 new tokens and 64 prompts x 32 new tokens, prompt lengths drawn
uniformly from 16..256 (one seed), end-of-sequence disabled so every request generates all its
tokens. Printed: generated tokens per second (wall clock of one run each, including prefill),
ratios to transformers, whether kernelhub's tokens equal transformers' and the KV-pool memory.
`--plot PATH` writes a PNG of tokens/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import kernelhub
from kernelhub.runtime.batching import generate_batch
from kernelhub.testing.samples import smollm2_gguf, write_random_checkpoint

WORKLOADS = [(8, 128), (64, 32)]  # (prompts, new tokens each)
SMOLLM2_SHAPE = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                 "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}


def workload(vocab, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 257, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def transformers_model(name, path):
    import transformers

    if name == "SmolLM2-135M":
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32, attn_implementation="sdpa")
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                  attn_implementation="sdpa")
    return model.eval()


def transformers_cb(model, prompts, new):
    """transformers' continuous batching, the best of a few small configurations (no warmup)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    best = None
    for page, batch_tokens in [(16, 256), (64, 512)]:
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=4 * len(prompts) * (256 + new) // page,
                                      max_batch_tokens=batch_tokens)
        out, seconds = timed(lambda cb=cb: model.generate_batch(prompts, generation_config=config,
                                                                continuous_batching_config=cb, warmup=False))
        tokens = [out[r].generated_tokens for r in sorted(out, key=lambda r: int(r.split("_")[-1]))]
        if best is None or seconds < best[1]:
            best = (tokens, seconds, f"page {page}, {batch_tokens} batch tokens")
    return best


def transformers_padded(model, prompts, new):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out, seconds = timed(lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                                do_sample=False, eos_token_id=None, pad_token_id=0))
    return out[:, width:].tolist(), seconds


def kernelhub_run(model, prompts, new, **kw):
    results, seconds = timed(lambda: generate_batch(model, prompts, max_new_tokens=new, **kw))
    return [r.tokens for r in results], seconds, results.stats


def cpu_rows(args):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(tmp)
        for name, path in [("tiny Llama", tmp), ("SmolLM2-135M", smollm2_gguf())]:
            # float weights, as transformers loads them: the same work on both sides (bench/gguf_models.py: packed)
            ours = kernelhub.from_pretrained(path, attn_implementation="paged|sdpa", dequantize=True)
            onednn = kernelhub.from_pretrained(path, attn_implementation="paged|sdpa", kernels={"Linear": "onednn"},
                                               dequantize=True)
            theirs = transformers_model(name, path)
            for n, new in WORKLOADS:
                prompts = workload(ours.config.vocab_size, n)
                total = n * new
                with torch.inference_mode():
                    cb_tokens, cb_s, cb_config = transformers_cb(theirs, prompts, new)
                    _, pad_s = transformers_padded(theirs, prompts, new)
                    tokens, s, stats = kernelhub_run(ours, prompts, new, max_batch_tokens=args.batch_tokens)
                    _, s_onednn, _ = kernelhub_run(onednn, prompts, new, max_batch_tokens=args.batch_tokens)
                same = sum(a == b for a, b in zip(tokens, cb_tokens))
                row = dict(model=name, prompts=n, new_tokens=new, kernelhub=total / s,
                           kernelhub_onednn=total / s_onednn, transformers_cb=total / cb_s,
                           transformers_padded=total / pad_s, cb_config=cb_config, same=f"{same}/{n}",
                           kv_pool_mib=stats["kv_memory_bytes"] / 2**20, peak_blocks=stats["peak_blocks"],
                           num_blocks=stats["num_blocks"], steps=stats["steps"],
                           preemptions=stats.get("preemptions", 0))
                rows.append(row)
                print(f"{name:13s} {n:3d} x {new:3d}  kernelhub {row['kernelhub']:8.1f} tok/s   "
                      f"transformers CB {row['transformers_cb']:8.1f} "
                      f"({row['kernelhub'] / row['transformers_cb']:.2f}x, "
                      f"{cb_config})   padded generate {row['transformers_padded']:8.1f} "
                      f"({row['kernelhub'] / row['transformers_padded']:.2f}x)   same tokens as CB {row['same']}   "
                      f"KV pool {row['kv_pool_mib']:.1f} MiB ({row['peak_blocks']}/{row['num_blocks'] - 1} blocks "
                      f"at peak), {row['steps']} steps   with oneDNN Linear {row['kernelhub_onednn']:8.1f} "
                      f"({row['kernelhub_onednn'] / row['transformers_cb']:.2f}x CB, "
                      f"{row['kernelhub_onednn'] / row['transformers_padded']:.2f}x padded)", flush=True)
    return rows


def gpu_rows(args):
    """flash vs sdpa through kernelhub on one GPU, bf16, a SmolLM2-shaped model with random weights."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_random_checkpoint(tmp, config=SMOLLM2_SHAPE)
        for n, new in WORKLOADS + [(256, 64)]:
            prompts = workload(SMOLLM2_SHAPE["vocab_size"], n)
            for attn in ("sdpa", "flash"):
                model = kernelhub.from_pretrained(tmp, attn_implementation=f"paged|{attn}", dtype="bfloat16",
                                                  device="cuda")
                kernelhub_run(model, prompts[:4], 4, max_batch_tokens=args.batch_tokens)  # CUDA/Triton warmup
                tokens, s, stats = kernelhub_run(model, prompts, new, max_batch_tokens=args.batch_tokens)
                rows.append(dict(model="SmolLM2-shaped bf16", attn=attn, prompts=n, new_tokens=new,
                                 tokens_per_s=n * new / s, kv_pool_mib=stats["kv_memory_bytes"] / 2**20,
                                 note=model.binding.entries[0].note))
                print(f"{attn:6s} {n:4d} x {new:3d}  {n * new / s:9.1f} tok/s  ({rows[-1]['note']})", flush=True)
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['prompts']} x {r['new_tokens']}" for r in rows]
    series = [("kernelhub generate_batch", "kernelhub"), ("kernelhub + oneDNN Linear", "kernelhub_onednn"),
              ("transformers generate_batch", "transformers_cb"),
              ("transformers padded generate", "transformers_padded")]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.2
    for i, (name, key) in enumerate(series):
        ax.bar([x + (i - 1.5) * width for x in range(len(rows))], [r[key] for r in rows], width, label=name)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("generated tokens / s (CPU, 2 threads)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Greedy continuous batching, one run each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="flash vs sdpa on a GPU instead of the CPU comparison")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--plot", help="write a PNG of tokens/s here")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}\n", flush=True)
    rows = gpu_rows(args) if args.gpu else cpu_rows(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot and not args.gpu:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
