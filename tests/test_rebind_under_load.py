"""Rebinding while other threads run forwards never mixes two bindings, even inside one forward or
one `generate` call: the bindings cycled here give *different* numbers (an RMSNorm kernel that
scales by 1.5, an attention backend that scales by 0.75), so a forward that ran half of one binding
and half of another matches none of them and is counted."""

import contextvars
import dataclasses
import threading
import time

import pytest
import torch

import kernelhub
from kernelhub.backends.sdpa import sdpa_attention

SECONDS = 10.0


class TimesOnePointFiveRMSNorm(torch.nn.Module):
    """RMSNorm's numbers times 1.5: a wrong kernel, bound with verify=False on purpose."""

    kernel_layer_name = "RMSNorm"

    def forward(self, x):
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return 1.5 * self.weight * out.to(x.dtype)


def _three_quarters_sdpa(module, q, k, v, mask, **kw):
    out, weights = sdpa_attention(module, q, k, v, mask, **kw)
    return 0.75 * out, weights


@pytest.fixture
def shifted_backend():
    """sdpa whose outputs are scaled by 0.75: an attention backend that differs from sdpa."""
    with kernelhub.scoped_registry():
        sdpa = next(b for b in kernelhub.backends() if b.name == "sdpa")
        kernelhub.register_backend(dataclasses.replace(sdpa, name="sdpa_x075", aliases=(), fn=_three_quarters_sdpa))
        yield "sdpa_x075"


BINDINGS = [("sdpa", None), ("sdpa", {"RMSNorm": TimesOnePointFiveRMSNorm}), ("sdpa_x075", None),
            ("sdpa_x075", {"RMSNorm": TimesOnePointFiveRMSNorm}), ("eager", None)]


def _under_load(model, bindings, run, agree, threads=6):
    """`threads` threads call `run()` for SECONDS while one more cycles `bindings`; each result must
    `agree` with one binding's. Returns (errors, mixed, runs, rebinds)."""
    stop = threading.Event()
    errors, mixed, runs, rebinds = [], [], [0] * threads, [0]

    def run_loop(i):
        while not stop.is_set():
            try:
                result = run()
            except Exception as e:  # noqa: BLE001 - counted, then reported
                errors.append(repr(e))
                continue
            if not agree(result):
                mixed.append(i)
            runs[i] += 1

    def rebind_loop():
        k = 0
        while not stop.is_set():
            attn, kernels = bindings[k % len(bindings)]
            kernelhub.bind(model, attn, kernels=kernels, verify=False)
            rebinds[0] += 1
            k += 1
            time.sleep(0.001)  # let the forward threads take the GIL between binds

    # each thread runs in a copy of this context: the scoped registry holding the test backend
    workers = [threading.Thread(target=contextvars.copy_context().run, args=(run_loop, i)) for i in range(threads)]
    workers.append(threading.Thread(target=contextvars.copy_context().run, args=(rebind_loop,)))
    for t in workers:
        t.start()
    time.sleep(SECONDS)
    stop.set()
    for t in workers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in workers), "a thread did not stop"
    return errors, mixed, sum(runs), rebinds[0]


def test_forwards_never_mix_two_bindings_while_another_thread_rebinds(tiny_checkpoint, shifted_backend):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding: a mask that is not the plain causal triangle
    expected = []
    for attn, kernels in BINDINGS:
        kernelhub.bind(model, attn, kernels=kernels, verify=False)
        with torch.no_grad():
            expected.append(model(ids, attention_mask=mask).logits[mask.bool()])
    # The bindings must be told apart, or a mixed forward could pass unseen.
    for i in range(len(expected)):
        for j in range(i + 1, len(expected) - (i == 0)):  # sdpa and eager agree, by design
            assert (expected[i] - expected[j]).abs().max() > 1e-2, (BINDINGS[i], BINDINGS[j])

    def forward():
        with torch.no_grad():
            return model(ids, attention_mask=mask).logits[mask.bool()]

    def agree(logits):
        return any((logits - e).abs().max().item() <= 1e-5 for e in expected)

    errors, mixed, runs, rebinds = _under_load(model, BINDINGS, forward, agree)
    assert not errors, f"{len(errors)} exceptions, first: {errors[:3]}"
    assert not mixed, f"{len(mixed)} of {runs} forwards matched no binding: they mixed two"
    assert runs > 50 and rebinds > 50, (runs, rebinds)


def test_a_generate_call_runs_one_binding_while_another_thread_rebinds(tiny_checkpoint, shifted_backend):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    bindings = BINDINGS[:4]
    expected = []
    for attn, kernels in bindings:
        kernelhub.bind(model, attn, kernels=kernels, verify=False)
        expected.append(model.generate(ids, max_new_tokens=8)[0, 6:].tolist())
    assert len({tuple(e) for e in expected}) == len(expected), f"bindings give the same tokens: {expected}"

    errors, mixed, runs, rebinds = _under_load(
        model, bindings, lambda: model.generate(ids, max_new_tokens=8)[0, 6:].tolist(), lambda t: t in expected,
        threads=4)
    assert not errors, f"{len(errors)} exceptions, first: {errors[:3]}"
    assert not mixed, f"{len(mixed)} of {runs} generate calls matched no binding's tokens: they mixed two"
    assert runs > 20 and rebinds > 50, (runs, rebinds)


def test_a_compiled_generate_call_runs_one_binding_while_another_thread_rebinds(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    bindings = BINDINGS[:2]  # registered names only: the rebinding thread sees the process registry
    expected = []
    for attn, kernels in bindings * 2:  # twice round: a graph built for one binding must not serve another
        kernelhub.bind(model, attn, kernels=kernels, verify=False)
        eager = model.generate(ids, max_new_tokens=6)[0, 6:].tolist()
        assert model.generate(ids, max_new_tokens=6, cache="static", compile=True)[0, 6:].tolist() == eager
        expected.append(eager)
    assert expected[0] != expected[1], f"the bindings give the same tokens: {expected}"

    errors, mixed, runs, rebinds = _under_load(
        model, bindings, lambda: model.generate(ids, max_new_tokens=6, cache="static", compile=True)[0, 6:].tolist(),
        lambda t: t in expected, threads=1)
    assert not errors, f"{len(errors)} exceptions, first: {errors[:3]}"
    assert not mixed, f"{len(mixed)} of {runs} compiled generate calls matched no binding's tokens: they mixed two"
    assert runs > 3 and rebinds > 3, (runs, rebinds)


def test_rebinding_from_inside_a_compiled_generate_call_is_refused(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="sdpa")

    class Rebinder:
        def put(self, tokens):
            kernelhub.bind(model, "eager")

        def end(self):
            pass

    with pytest.raises(kernelhub.BindError, match="from inside its own compiled generate call"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, cache="static", compile=True, streamer=Rebinder())
    assert model.binding.chosen() == {"sdpa"}
