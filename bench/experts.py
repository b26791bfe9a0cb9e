"""Mixture-of-experts: kernelhub's `Experts` kernels vs transformers 5.22.2's experts implementations.

    .venv/bin/python bench/experts.py                 # layer and Qwen3-MoE-shaped model, CPU
    .venv/bin/python bench/experts.py --tiny          # a seconds-long smoke run

1. The layer: kernelhub's `Experts` bound to eager, grouped_mm and batched_mm against
   transformers' `Qwen3MoeExperts` with the same weights and `experts_implementation` set to
   the same name, for decode-sized (1, 8 tokens) and prefill-sized inputs. Printed as time
   ratios from one run (kernelhub / transformers, below 1.00 is faster), also against
   transformers' default (grouped_mm). On a GPU, also our Triton kernel (hub_kernels/moe)
   against grouped_mm in bfloat16.
2. The model: a Qwen3-MoE-shaped random checkpoint written by transformers, greedy decode
   tokens/s through `kernelhub.from_pretrained(path, experts_implementation=...)` against
   transformers with its default experts implementation (kernelhub / transformers, higher is
   better), at torch's default thread count. Ours and theirs run back to back in each round;
   the ratio printed is the median of the per-round ratios, with their range.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import kernelhub
from kernelhub.declare.experts import Experts

HUB_MOE = Path(__file__).resolve().parents[1] / "hub_kernels" / "moe"
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
# Qwen3-30B-A3B's expert shapes scaled down to fit a CPU run (it has hidden 2048, 128 experts of 768, top-8).
LAYER = dict(hidden=1024, inter=384, experts=64, top_k=8)
MODEL = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=384,
             num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4, head_dim=64, num_experts=64,
             num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=1024)
TINY_LAYER = dict(hidden=64, inter=32, experts=8, top_k=2)
TINY_MODEL = dict(MODEL, vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                  num_experts_per_tok=2)


def interleaved(fns, repeat, sync=lambda: None):
    """Median seconds of each function, run in turn so load drift hits all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - start)
    return [statistics.median(ts) for ts in times]


class Holder(torch.nn.Module):
    """One `Experts` layer, bound through kernelhub.bind like any model."""

    def __init__(self, experts):
        super().__init__()
        self.experts, self.binding, self.binding_request = experts, None, None


def transformers_experts(shape, implementation, dtype, device):
    import transformers
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = transformers.Qwen3MoeConfig(hidden_size=shape["hidden"], moe_intermediate_size=shape["inter"],
                                         num_experts=shape["experts"], num_experts_per_tok=shape["top_k"])
    config._experts_implementation = implementation
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, shape["hidden"] ** -0.5)
        experts.down_proj.normal_(0, shape["inter"] ** -0.5)
    return experts.to(device, dtype)


def ours_bound(theirs, shape, kernel):
    experts = Experts(shape["experts"], shape["hidden"], shape["inter"]).to(theirs.gate_up_proj.device,
                                                                             theirs.gate_up_proj.dtype)
    experts.gate_up_proj, experts.down_proj = theirs.gate_up_proj, theirs.down_proj  # the same tensors
    holder = Holder(experts)
    kernelhub.bind(holder, kernels={"Experts": kernel})
    return holder.experts


def routed(tokens, shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, shape["hidden"], generator=g).to(device, dtype)
    weights, index = torch.randn(tokens, shape["experts"], generator=g).softmax(-1).topk(shape["top_k"], dim=-1)
    return x, index.to(device), (weights / weights.sum(-1, keepdim=True)).to(device, dtype)


def bench_layer(shape, token_counts, repeat):
    print(f"Experts layer: {shape['experts']} experts, hidden {shape['hidden']}, intermediate {shape['inter']}, "
          f"top-{shape['top_k']}, float32, cpu, {torch.get_num_threads()} threads")
    print("time ratio kernelhub / transformers (same implementation; below 1.00 is faster), and kernelhub / "
          "transformers' default (grouped_mm)\n")
    print(f"{'tokens':>6s} {'implementation':14s} {'ours ms':>9s} {'theirs ms':>9s} {'ratio':>6s} "
          f"{'vs default':>10s} {'max diff':>9s}")
    theirs = {impl: transformers_experts(shape, impl, torch.float32, "cpu") for impl in IMPLEMENTATIONS}
    ours = {impl: ours_bound(theirs["eager"], shape, impl) for impl in IMPLEMENTATIONS}
    for impl in IMPLEMENTATIONS[1:]:  # every transformers module reads the same weights
        theirs[impl].gate_up_proj, theirs[impl].down_proj = theirs["eager"].gate_up_proj, theirs["eager"].down_proj
    with torch.inference_mode():
        for tokens in token_counts:
            x, index, weights = routed(tokens, shape, torch.float32, "cpu", seed=tokens)
            calls = [lambda m=m, args=(x, index, weights): m(*args)
                     for impl in IMPLEMENTATIONS for m in (ours[impl], theirs[impl])]
            times = interleaved(calls, repeat)
            default = times[2 * IMPLEMENTATIONS.index("grouped_mm") + 1]
            for i, impl in enumerate(IMPLEMENTATIONS):
                t_ours, t_theirs = times[2 * i], times[2 * i + 1]
                diff = (ours[impl](x, index, weights) - theirs[impl](x, index, weights)).abs().max().item()
                print(f"{tokens:6d} {impl:14s} {t_ours * 1e3:9.3f} {t_theirs * 1e3:9.3f} {t_ours / t_theirs:6.2f} "
                      f"{t_ours / default:10.2f} {diff:9.1e}")


def bench_triton_gpu(shape, token_counts, repeat):
    """Our Triton kernel (hub_kernels/moe) against grouped_mm, bfloat16, on CUDA."""
    sys.path.insert(0, str(HUB_MOE / "torch-ext"))
    import moe

    theirs = transformers_experts(shape, "grouped_mm", torch.bfloat16, "cuda")
    grouped = ours_bound(theirs, shape, "grouped_mm")
    print(f"\nTriton MoE kernel vs grouped_mm on {torch.cuda.get_device_name()}, bfloat16 "
          "(time ratio triton / grouped_mm; below 1.00 is faster)\n")
    print(f"{'tokens':>6s} {'triton ms':>9s} {'grouped ms':>10s} {'ratio':>6s} {'max rel diff':>12s}")
    with torch.inference_mode():
        for tokens in token_counts:
            x, index, weights = routed(tokens, shape, torch.bfloat16, "cuda", seed=tokens)
            args = (x, index, weights)
            triton_fn = lambda args=args: moe.moe_experts(*args, theirs.gate_up_proj, theirs.down_proj)  # noqa: E731
            t_triton, t_grouped = interleaved([triton_fn, lambda args=args: grouped(*args)], repeat,
                                              torch.cuda.synchronize)
            want = grouped(x, index, weights).float()
            diff = ((triton_fn().float() - want).abs().max() / want.abs().max()).item()
            print(f"{tokens:6d} {t_triton * 1e3:9.3f} {t_grouped * 1e3:10.3f} {t_triton / t_grouped:6.2f} {diff:12.1e}")


def decode_rates(ours, theirs, ids, new_tokens, repeat):
    """Per round, decode tokens/s of each: (generate(n) - generate(1)) / (n - 1), ours and theirs interleaved."""
    runs = [lambda k=k: ours.generate(ids, max_new_tokens=k, min_new_tokens=k) for k in (1, new_tokens)]
    runs += [lambda k=k: theirs.generate(input_ids=ids, max_new_tokens=k, do_sample=False) for k in (1, new_tokens)]
    for run in runs:
        run()
    rounds = []
    for _ in range(repeat):
        times = []
        for run in runs:
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rounds.append(((new_tokens - 1) / (times[1] - times[0]), (new_tokens - 1) / (times[3] - times[2])))
    return rounds


def bench_qwen3_moe_decode(config, new_tokens, repeat, prompt_len=16, implementations=(None, *IMPLEMENTATIONS)):
    """Decode tokens/s of a Qwen3-MoE-shaped random model: kernelhub (per experts implementation) vs transformers.

    Load from other processes skews single runs, so every round times ours and theirs back to back
    and the ratio reported is the median of the per-round ratios (rounds disturbed mid-way give
    outliers, even negative rates; the median ignores them).
    """
    import transformers

    if "qwen3_moe" not in kernelhub.get_registry().architectures:
        print("\nqwen3_moe is not a registered architecture here; skipping the model benchmark")
        return
    with tempfile.TemporaryDirectory() as path, torch.inference_mode():
        torch.manual_seed(0)
        transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**config)).save_pretrained(path)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        theirs.generation_config.eos_token_id = None  # both generate exactly new_tokens tokens
        default = theirs.config._experts_implementation
        ids = torch.randint(0, config["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(0))
        print(f"\nQwen3-MoE-shaped random model: {config['num_hidden_layers']} layers, {config['num_experts']} experts "
              f"of {config['moe_intermediate_size']}, top-{config['num_experts_per_tok']}, hidden "
              f"{config['hidden_size']}; float32, greedy, batch 1, prompt {prompt_len}, {new_tokens} new tokens, "
              f"{torch.get_num_threads()} threads, {repeat} interleaved rounds")
        print(f"decode tokens/s kernelhub / transformers (experts_implementation={default!r}); higher is better\n")
        print(f"{'kernelhub experts':20s} {'ours tok/s':>10s} {'theirs tok/s':>12s} {'median ratio':>12s} "
              f"{'ratio range':>13s}  same tokens")
        for impl in implementations:
            ours = kernelhub.from_pretrained(path, experts_implementation=impl, dtype="float32")
            same = (ours.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens).tolist()
                    == theirs.generate(input_ids=ids, max_new_tokens=new_tokens, do_sample=False).tolist())
            rounds = decode_rates(ours, theirs, ids, new_tokens, repeat)
            ratios = sorted(o / t for o, t in rounds)
            label = impl or "unbound (reference)"
            print(f"{label:20s} {statistics.median(o for o, _ in rounds):10.1f} "
                  f"{statistics.median(t for _, t in rounds):12.1f} {statistics.median(ratios):12.2f} "
                  f"{ratios[0]:6.2f}..{ratios[-1]:<5.2f}  {same}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: a smoke run, not a measurement")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--skip-layer", action="store_true")
    parser.add_argument("--model-experts", nargs="+", choices=("reference", *IMPLEMENTATIONS),
                        default=("reference", *IMPLEMENTATIONS), help="kernelhub experts kernels in the model run")
    args = parser.parse_args()
    layer, model = (TINY_LAYER, TINY_MODEL) if args.tiny else (LAYER, MODEL)
    repeat = 2 if args.tiny else args.repeat
    if not args.skip_layer:
        bench_layer(layer, (1, 8, 16) if args.tiny else (1, 8, 256), repeat)
    if torch.cuda.is_available():
        bench_triton_gpu(layer, (1, 8, 256, 4096), repeat)
    if not args.skip_model:
        implementations = tuple(None if name == "reference" else name for name in args.model_experts)
        bench_qwen3_moe_decode(model, 4 if args.tiny else args.new_tokens, repeat, implementations=implementations)


if __name__ == "__main__":
    main()
