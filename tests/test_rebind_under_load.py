"""Rebinding while other threads run forwards never mixes two bindings: each site swaps one
immutable record, each layer one forward, and every forward reads them once."""

import threading
import time

import torch

import kernelhub
from tests.test_binding_pipeline import ScaledRMSNorm

SECONDS = 10.0


def test_eight_threads_of_forwards_while_another_rebinds_for_ten_seconds(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding: a mask that is not the plain causal triangle
    with torch.no_grad():
        reference = model(ids, attention_mask=mask).logits
    bindings = [(attn, kernels) for attn in ("eager", "sdpa", "flex")
                for kernels in (None, {"RMSNorm": ScaledRMSNorm})]
    # One forward per binding first: flex compiles on its first call (seconds on this CPU), which
    # would otherwise eat the window this test measures rebinding in.
    for attn, kernels in bindings:
        kernelhub.bind(model, attn, kernels=kernels)
        with torch.no_grad():
            model(ids, attention_mask=mask)
    kernelhub.bind(model, "eager")
    stop = threading.Event()
    errors, wrong, forwards, rebinds = [], [], [0] * 8, [0]

    def forwards_loop(i):
        while not stop.is_set():
            try:
                with torch.no_grad():
                    logits = model(ids, attention_mask=mask).logits
            except Exception as e:  # noqa: BLE001 - counted, then reported
                errors.append(repr(e))
                continue
            diff = (logits - reference)[mask.bool()].abs().max().item()
            if diff > 1e-5:
                wrong.append(diff)
            forwards[i] += 1

    def rebind_loop():
        k = 0
        while not stop.is_set():
            attn, kernels = bindings[k % len(bindings)]
            kernelhub.bind(model, attn, kernels=kernels)
            rebinds[0] += 1
            k += 1
            time.sleep(0.002)  # a bind takes ~1 ms: without a pause this thread would hold the GIL throughout

    threads = [threading.Thread(target=forwards_loop, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=rebind_loop))
    for t in threads:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, f"{len(errors)} exceptions, first: {errors[:3]}"
    assert not wrong, f"{len(wrong)} of {sum(forwards)} forwards had wrong logits (max |diff| {max(wrong):.3g})"
    assert sum(forwards) > 50 and rebinds[0] > 50, (forwards, rebinds)
