"""`kernelhub diff`: run one model under two bindings on the same tokens and show where they part.

    kernelhub diff MODEL --a eager --b sdpa [--prompt TEXT | --ids 1,2,3] [--atol A --rtol R] [--json]
    kernelhub diff MODEL --a eager --b 'attn=eager,kernels.RMSNorm=./my-rmsnorm'
    kernelhub diff MODEL --a eager --b '{"attn": "eager", "kernels": {"RMSNorm": "my-org/rmsnorm@v1"}}'
    kernelhub diff org/name --revision v2 --gguf-file model-Q4_K_M.gguf --a sdpa --b flex

The model is loaded once per binding and traced with `kernelhub.debug.trace`; the table
lists every module call in forward order (the order outputs were produced) with the
maximum absolute and relative difference of its outputs, --b measured against --a, and
names the first module beyond tolerance. Tolerances follow each tensor's magnitude and
dtype (`kernelhub.debug.compare_traces`): |b - a| <= tol * max|a| + tol * |a|, tol = 256
float32 ulps (3.1e-5), 16 ulps of a 16-bit float; --atol (absolute) and --rtol override.
Layer kernels are bound without the conformance probe (a wrong kernel is what diff finds).
Exit status: 0 when every module matches, 1 when one diverges (usable in CI); bad
arguments raise `KernelhubError`.

Input tokens: --ids, else the model's tokenizer on --prompt, else a fixed sequence of
16 ids (the same on every run).
"""

from __future__ import annotations

import json

import torch

from kernelhub.declare.errors import KernelhubError

BINDING_HELP = ("an attn_implementation name ('sdpa'), key=value pairs ('attn=sdpa,kernels.RMSNorm=./dir') or JSON "
                "('{\"attn\": \"sdpa\", \"kernels\": {\"RMSNorm\": \"./dir\"}}')")
DEFAULT_LENGTH = 16


def parse_binding(text: str) -> dict:
    """`{"attn": ..., "kernels": ...}` from what a user typed for --a / --b (see BINDING_HELP).

    >>> parse_binding("sdpa")
    {'attn': 'sdpa', 'kernels': None}
    >>> parse_binding("attn=eager,kernels.RMSNorm=./dir")
    {'attn': 'eager', 'kernels': {'RMSNorm': './dir'}}
    >>> parse_binding('{"kernels": {"RMSNorm": "./dir"}}')
    {'attn': None, 'kernels': {'RMSNorm': './dir'}}
    """
    text = text.strip()
    if not text:
        raise KernelhubError(f"empty binding: expected {BINDING_HELP}")
    if text.startswith("["):  # a JSON preference list is an attn_implementation
        return {"attn": _json(text), "kernels": None}
    if text.startswith("{"):
        spec = _json(text)
        unknown = spec.keys() - {"attn", "attn_implementation", "kernels"}
        if unknown:
            raise KernelhubError(f"binding {text!r}: unknown key(s) {', '.join(sorted(unknown))}; allowed: attn, "
                                 "kernels (a per-layer-type attention dict goes under \"attn\")")
        kernels = spec.get("kernels")
        if kernels is not None and not isinstance(kernels, dict):
            raise KernelhubError(f"binding {text!r}: \"kernels\" must be an object like {{\"RMSNorm\": \"./dir\"}}")
        return {"attn": spec.get("attn", spec.get("attn_implementation")), "kernels": kernels}
    if "=" not in text:
        return {"attn": text, "kernels": None}
    attn, kernels = None, {}
    for pair in text.split(","):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not value:
            raise KernelhubError(f"binding {text!r}: {pair!r} is not key=value; expected {BINDING_HELP}")
        if key in ("attn", "attn_implementation"):
            attn = value
        elif key.startswith("kernels.") and len(key) > len("kernels."):
            kernels[key.removeprefix("kernels.")] = value
        else:
            raise KernelhubError(f"binding {text!r}: unknown key {key!r}; allowed: attn, kernels.<LayerName>")
    return {"attn": attn, "kernels": kernels or None}


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise KernelhubError(f"binding {text!r} is not valid JSON: {e}") from None


def parse_ids(text: str, vocab_size: int) -> torch.Tensor:
    """`[[1, 2, 3]]` from "1,2,3", each id checked against the vocabulary."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KernelhubError(f"--ids {text!r}: expected comma-separated integers like 1,2,3") from None
    if not ids:
        raise KernelhubError("--ids is empty: give at least one token id, like 1,2,3")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise KernelhubError(f"--ids: {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return torch.tensor([ids])


def input_ids(args, model) -> torch.Tensor:
    """The tokens both runs see: --ids, else --prompt through the model's tokenizer, else a fixed sequence."""
    vocab = model.get_input_embeddings().num_embeddings
    if args.ids is not None:
        return parse_ids(args.ids, vocab)
    if args.prompt is not None:
        from kernelhub.runtime.pretrained import load_tokenizer

        ids = load_tokenizer(args.model, model=model, revision=args.revision, gguf_file=args.gguf_file).encode(
            args.prompt)
        if not ids:
            raise KernelhubError(f"--prompt {args.prompt!r} encodes to no tokens")
        return torch.tensor([ids])
    return torch.tensor([[(7 * i + 3) % vocab for i in range(DEFAULT_LENGTH)]])  # deterministic, spread out


def load_bound(path, binding: dict, *, dtype=None, device="cpu", **source):
    """The model at `path` (`source`: `from_pretrained`'s revision, gguf_file, dequantize) bound as
    `binding` says, layer kernels unverified: `diff` exists to measure a kernel that may be wrong, so
    the bind-time conformance probe must not refuse it."""
    from kernelhub.registry.bind import bind
    from kernelhub.runtime.pretrained import from_pretrained

    model = from_pretrained(path, attn_implementation=binding["attn"], dtype=dtype, device=device, **source)
    if binding["kernels"]:
        request = model.binding.request  # keep what loading chose (attention, Experts defaults)
        bind(model, request.attn_implementation, {**(request.kernels or {}), **binding["kernels"]},
             mode=request.mode, verify=False)
    return model


def cmd_diff(args) -> int:
    from kernelhub.cli.args import source_options
    from kernelhub.debug import compare, format_comparison, trace

    bindings = [parse_binding(args.a), parse_binding(args.b)]  # both checked before any weight is read
    traces, ids = [], None
    for binding in bindings:
        model = load_bound(args.model, binding, dtype=args.dtype, device=args.device, **source_options(args))
        ids = input_ids(args, model) if ids is None else ids
        traces.append(trace(model, ids.to(args.device), keep_tensors=True))
        del model  # one model in memory at a time
    result = compare(*traces, atol=args.atol, rtol=args.rtol)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "ids": ids[0].tolist(), **result}, indent=2))
    else:
        print(f"a: {args.a}\nb: {args.b}\ninput: {ids.shape[1]} tokens\n")
        print(format_comparison(result))
    return 0 if result["ok"] else 1


def add_diff_command(subparsers, parents=()) -> None:
    """Register `diff` on the `kernelhub` command's subparsers (`args.fn(args)` runs it); `parents`
    carry the options every command shares (--debug, -v/-q)."""
    from kernelhub.cli.args import add_source_options, device_type

    p = subparsers.add_parser("diff", help="compare a model module by module under two bindings",
                              description=__doc__.split("\n\n")[1].strip(), parents=list(parents))
    p.add_argument("model", help="checkpoint directory, .gguf file, or Hub model id org/name[@REV]")
    add_source_options(p)
    p.add_argument("--a", required=True, help=f"the reference binding: {BINDING_HELP}")
    p.add_argument("--b", required=True, help="the binding compared against --a (same forms)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, help="text for the model's tokenizer")
    source.add_argument("--ids", default=None, help="token ids, comma-separated (e.g. 1,2,3)")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute tolerance (default: per tensor, tol(dtype) * max|a|, tol = 256 float32 ulps "
                        "or 16 ulps of a 16-bit float)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default: tol(dtype))")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="load in this dtype (default: the checkpoint's)")
    p.add_argument("--device", type=device_type, default="cpu",
                   help="run both bindings on this device, checked before loading (default: cpu)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.set_defaults(fn=cmd_diff)
