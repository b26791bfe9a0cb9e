"""Warm bind time with Hub kernels: a 24-layer Llama whose kernels are in the local HF cache.

    .venv/bin/python bench/bind.py            # or: make bench

The four hub_kernels are built and laid out in a temporary HF cache exactly as a download
leaves them, with HF_HUB_OFFLINE=1, so every bind resolves `org/name@v1` through the real
`kernels` code path without a network. Reports the first bind (resolve + import), then the
median warm bind of a fresh model, next to Hugging Face `kernels.kernelize` on the same
model and kernels (median of runs; one run on this machine, noisy within ±10%). The first
bind is reported twice: with kernelhub's verified store empty (every file hashed and copied)
and as a new process finds it (the copies re-read and compared before reuse). Every bind runs
conformance (each kernel probed against its layer's reference, verdicts cached): the probe
cost of each kernel is reported, and warm binds with and without it. The cost of one binding
per forward (every site and layer looking itself up in the published record) is measured by
bench/forward.py, against the same model with sdpa hard-wired into every site.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="kernelhub-bench-cache-")
os.environ["KERNELHUB_TRUSTED"] = "bench-org"
os.environ["KERNELHUB_CACHE"] = tempfile.mkdtemp(prefix="kernelhub-bench-store-")  # an empty verified store

import torch  # noqa: E402

import kernelhub  # noqa: E402
from kernelhub.kernel.build import build_kernel  # noqa: E402
from kernelhub.models.llama import LlamaForCausalLM  # noqa: E402
from kernelhub.testing import populate_hub_cache  # noqa: E402

HUB_KERNELS = Path(__file__).resolve().parents[1] / "hub_kernels"
CONFIG = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=24,
              num_attention_heads=4, num_key_value_heads=2)
KERNELS = {"RMSNorm": "bench-org/rmsnorm@v1", "SiLUAndMul": "bench-org/silu-and-mul@v1",
           "ApplyRotary": "bench-org/rotary@v1"}


def fresh_model():
    with torch.device("meta"):
        return LlamaForCausalLM(CONFIG)


def median_ms(fn, repeat=20):
    times = []
    for _ in range(repeat):
        model = fresh_model()
        start = time.perf_counter()
        fn(model)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main():
    for name in ("rmsnorm", "silu-and-mul", "rotary"):
        build_kernel(HUB_KERNELS / name)
        populate_hub_cache(os.environ["HF_HUB_CACHE"], f"bench-org/{name}", HUB_KERNELS / name)
    start = time.perf_counter()
    plan = kernelhub.bind(fresh_model(), "sdpa", kernels=KERNELS, device="cpu")
    first = (time.perf_counter() - start) * 1e3
    layers = sum(1 for e in plan.entries if e.kind == "layer" and e.chosen != "reference")
    from kernelhub.registry.hub.loader import forget_loaded

    forget_loaded()  # as a new process would start: the verified copies exist and are re-checked
    start = time.perf_counter()
    kernelhub.bind(fresh_model(), "sdpa", kernels=KERNELS, device="cpu")
    reuse = (time.perf_counter() - start) * 1e3
    warm = median_ms(lambda m: kernelhub.bind(m, "sdpa", kernels=KERNELS, device="cpu"))
    unverified = median_ms(lambda m: kernelhub.bind(m, "sdpa", kernels=KERNELS, device="cpu", verify=False))
    probes = probe_costs(plan)

    from kernels import LocalLayerRepository, Mode, kernelize, use_kernel_mapping

    mapping = {name: {"cpu": LocalLayerRepository(repo_path=HUB_KERNELS / repo, layer_name=name)}
               for name, repo in (("RMSNorm", "rmsnorm"), ("SiLUAndMul", "silu-and-mul"), ("ApplyRotary", "rotary"))}
    with use_kernel_mapping(mapping, inherit_mapping=False):
        kernelize(fresh_model(), mode=Mode.INFERENCE, device="cpu")  # warm its caches too
        hf = median_ms(lambda m: kernelize(m, mode=Mode.INFERENCE, device="cpu"))
    print(f"24-layer Llama, {layers} Hub-kernel layers (rmsnorm, silu-and-mul, rotary), cached, offline")
    print(f"first bind, empty verified store:       {first:8.1f} ms   (resolve + hash + private copy + import)")
    print(f"first bind, verified copies reused:     {reuse:8.1f} ms   (resolve + hash + re-check copy + import)")
    print(f"warm bind, fresh model (median of 20):  {warm:8.1f} ms   target < 50 ms")
    print(f"warm bind, verify=False (median of 20): {unverified:8.1f} ms   (conformance look-ups cost "
          f"{warm - unverified:.1f} ms warm)")
    for name, ms in probes.items():
        print(f"  cold conformance probe, {name:<14}{ms:8.2f} ms   (once per kernel, dtype and device)")
    print(f"kernels.kernelize, same model/kernels:  {hf:8.1f} ms   ratio kernelhub/kernelize {warm / hf:.2f}")


def probe_costs(plan) -> dict:
    """Each kernel's conformance probe, timed cold (its cached verdict dropped first)."""
    from kernelhub.registry import conformance

    model = fresh_model()
    kernelhub.bind(model, "sdpa", kernels=KERNELS, device="cpu")
    costs = {}
    for entry in plan.entries:
        layer = entry.source.rsplit("(", 1)[-1].rstrip(")")
        if entry.kind != "layer" or entry.chosen == "reference" or layer in costs:
            continue
        module = model.get_submodule(entry.path)
        forward = module.__dict__["_kernelhub_forward"]
        with conformance._lock:
            conformance._cache.clear()
        start = time.perf_counter()
        conformance.check_layer(forward, module, torch.float32, torch.device("cpu"))
        costs[layer] = (time.perf_counter() - start) * 1e3
    return costs


if __name__ == "__main__":
    main()
