"""The `kernelhub` command line: backends, plugins, explain, run, demo, lock, download, kernel.

    kernelhub backends              capability matrix on this machine
    kernelhub plugins               loaded plugins and the ones that failed
    kernelhub explain MODEL_DIR --attn flex [--kernels JSON] [--lock kernelhub.lock]
    kernelhub run MODEL --prompt "..." [--attn X] [--max-new-tokens N] [--temperature T --top-k K --top-p P --seed S]
    kernelhub demo
    kernelhub lock | download | kernel build|check|publish     (see cli_hub.py)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from kernelhub.cli_hub import add_hub_commands


def cmd_backends(args) -> int:
    from kernelhub.docs_gen import capability_rows
    from kernelhub.registry.plugins import backend_sources
    from kernelhub.registry.capabilities import machine_problems

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"attention backends on this machine ({device}):\n")
    rows = capability_rows(backend_sources())
    header = ["name", "aliases", "mask", "head_dim", "backward", "source", "features"]
    widths = [max(len(str(r[h])) for r in rows + [dict(zip(header, header))]) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  status")
    for entry, row in zip(backend_sources(), rows):
        reasons = machine_problems(entry.backend, device)
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        print("  ".join(str(row[h]).ljust(w) for h, w in zip(header, widths)) + "  " + status)
    return 0


def cmd_plugins(args) -> int:
    from kernelhub.registry.plugins import get_registry

    reg = get_registry()
    print("loaded plugins:")
    for name in reg.plugins:
        print(f"  {name}")
    print("failed plugins:" if reg.failures else "failed plugins: none")
    for failure in reg.failures:
        print(f"  {failure.plugin}: {failure.error}")
    return 1 if reg.failures and args.strict else 0


def _parse_attn(text):
    if text is None:
        return None
    if text.startswith(("[", "{")):
        return json.loads(text)
    return text


def cmd_explain(args) -> int:
    from kernelhub.registry.pretrained import explain

    kernels = json.loads(args.kernels) if args.kernels else None
    plan = explain(args.model, attn_implementation=_parse_attn(args.attn), kernels=kernels, dtype=args.dtype,
                   mode=args.mode, lock=args.lock)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0


def cmd_demo(args) -> int:
    from kernelhub.demo import run_demo

    return run_demo(attn=args.attn, max_new_tokens=args.max_new_tokens)


def cmd_run(args) -> int:
    import time

    from kernelhub.models.sampling import SamplingParams
    from kernelhub.registry.pretrained import from_pretrained, load_tokenizer

    # temperature 0 means greedy here, as in most chat CLIs; bad values fail before the model loads
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=args.temperature != 0,
                              temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    kernels = json.loads(args.kernels) if args.kernels else None
    model = from_pretrained(args.model, attn_implementation=_parse_attn(args.attn), kernels=kernels, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model, model=model)
    if not hasattr(model, "generate"):  # an encoder: show the sentence embedding
        from kernelhub.models.bert import mean_pool

        batch = tokenizer([args.prompt])
        with torch.no_grad():
            emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])[0]
        print(f"sentence embedding ({emb.numel()} dims): {[round(v, 4) for v in emb[:8].tolist()]} ...")
        return 0
    text = args.prompt
    if tokenizer.chat_template and not args.no_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    ids = torch.tensor([tokenizer.encode(text)])
    start = time.perf_counter()
    out = model.generate(ids, sampling=sampling, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(out[0, ids.shape[1]:]).strip())
    new = out.shape[1] - ids.shape[1]
    print(f"\n[{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s, attention: "
          f"{', '.join(sorted(model.binding.chosen()))}]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kernelhub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("backends", help="list attention backends and whether they run here").set_defaults(fn=cmd_backends)
    p = sub.add_parser("plugins", help="list loaded and failed plugins")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed")
    p.set_defaults(fn=cmd_plugins)
    p = sub.add_parser("explain", help="print the binding plan for a checkpoint without loading weights")
    p.add_argument("model", help="checkpoint directory (config.json)")
    p.add_argument("--attn", default=None, help="attn_implementation: a name, paged|NAME, or JSON list/dict")
    p.add_argument("--dtype", default=None)
    p.add_argument("--mode", default="inference", choices=["inference", "training", "compile"])
    p.add_argument("--kernels", default=None, help='layer kernels as JSON, e.g. \'{"RMSNorm": "org/rmsnorm@v1"}\'')
    p.add_argument("--lock", default=None, help="verify Hub kernels against this lock file")
    p.add_argument("--json", action="store_true", help="print plan.to_dict() as JSON")
    p.set_defaults(fn=cmd_explain)
    p = sub.add_parser("demo", help="embed with MiniLM under each backend, chat with SmolLM2")
    p.add_argument("--attn", default="sdpa", help="attention backend for the chat part")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("run", help="generate from a checkpoint directory or .gguf file")
    p.add_argument("model", help="checkpoint directory or .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--attn", default=None, help="attn_implementation (default: recorded, else sdpa)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with probability >= P")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--kernels", default=None, help='layer kernels as JSON, e.g. \'{"Linear": "onednn"}\'')
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.set_defaults(fn=cmd_run)
    add_hub_commands(sub)
    args = parser.parse_args(argv)
    from kernelhub.declare.errors import KernelhubError

    try:
        return args.fn(args)
    except KernelhubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
