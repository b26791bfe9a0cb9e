"""Eight threads binding models that use one Hub kernel import it once; forwards running
meanwhile on another model see either binding, never a broken one."""

import builtins
import threading

import torch

import kernelhub
from tests.threads import run_in_threads

ORG = "kernelhub-test"


def test_eight_threads_bind_one_kernel_and_import_it_exactly_once(hub, tiny_checkpoint):
    builtins.__dict__.pop("_kernelhub_counted_imports", None)
    models = [kernelhub.from_pretrained(tiny_checkpoint) for _ in range(8)]
    serving = kernelhub.from_pretrained(tiny_checkpoint)
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        reference = serving(ids).logits
    stop, outputs = threading.Event(), []

    def forwards():
        while not stop.is_set():
            with torch.no_grad():
                outputs.append(serving(ids).logits)

    runner = threading.Thread(target=forwards)
    runner.start()
    plans = [None] * 8

    def bind(i):
        plans[i] = kernelhub.bind(models[i], "sdpa", kernels={"RMSNorm": f"{ORG}/counted@v1"})
        if i % 2 == 0:  # rebinding the served model while it runs forwards
            kernelhub.bind(serving, "sdpa", kernels={"RMSNorm": f"{ORG}/counted@v1"} if i % 4 else None)

    try:
        run_in_threads(bind)
    finally:
        stop.set()
        runner.join()
    assert builtins.__dict__["_kernelhub_counted_imports"] == [1], "the kernel was imported more than once"
    assert len({e.source for p in plans for e in p.entries if "RMSNorm" in e.source}) == 1
    assert outputs and all(torch.allclose(o, reference, atol=1e-5, rtol=1e-5) for o in outputs)
    for model in models:
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference, atol=1e-5, rtol=1e-5)
