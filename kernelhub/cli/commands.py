"""The `kernelhub` command line: backends, plugins, explain, run, demo, diff, lock, download, kernel.

    kernelhub backends              capability matrix on this machine (attention backends, layer kernels)
    kernelhub plugins               loaded plugins and the ones that failed
    kernelhub explain MODEL --attn flex [--kernels RMSNorm=org/rmsnorm@v1] [--lock kernelhub.lock] [--device D]
                                    MODEL: a directory, a .gguf file or a Hub id org/name[@REV] [--gguf-file F]
    kernelhub run MODEL --prompt "..." [--attn X] [--max-new-tokens N] [--temperature T --top-k K --top-p P --seed S]
                                    [--device D] [--tp N]  (tensor parallel on N ranks, or under torchrun)
    kernelhub demo
    kernelhub diff MODEL --a eager --b sdpa [--device D]         (see kernelhub/cli/diff.py)
    kernelhub lock | download | kernel init|build|check|publish  (see kernelhub/cli/hub.py)

Every command takes `--debug` and `-v`/`-q` (before or after its name). Every failure is one
line on stderr, `kernelhub: error: ...`, exit 2 for bad input and 1 otherwise; `--debug`
prints the traceback instead. `-v` logs at info (what was bound where), `-vv` at debug, `-q`
errors only, `-qq` critical only (the `kernelhub` logger; `KERNELHUB_VERBOSITY` otherwise).
Tables wrap to the terminal's width.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from kernelhub.cli.tables import format_table, terminal_width

from kernelhub.cli.args import (DTYPES, MODES, Parser, UsageError, add_source_options, device_type, non_negative_float,
                                one_line, positive_int, probability, request_type, source_options, verbosity_level)
from kernelhub.cli.diff import add_diff_command
from kernelhub.cli.hub import add_hub_commands
from kernelhub.declare.errors import KernelhubError


def cmd_backends(args) -> int:
    import torch

    from kernelhub.cli.docs_gen import capability_rows
    from kernelhub.registry.capabilities import machine_problems
    from kernelhub.registry.plugins import backend_sources

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"attention backends on this machine ({device}):\n")
    rows = capability_rows(backend_sources())
    header = ["name", "aliases", "mask", "head_dim", "backward", "source", "features"]
    table = [header + ["status"]]
    for entry, row in zip(backend_sources(), rows):
        reasons = machine_problems(entry.backend, device)
        status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        table.append([str(row[h]) for h in header] + [status])
    print("\n".join(format_table(table, wrap=("aliases", "head_dim", "backward", "source", "features", "status"))))
    _print_layer_kernels(device)
    return 0


def _print_layer_kernels(device: str) -> None:
    """Layer kernels per declared layer name, with their capabilities and whether they run on `device`."""
    from kernelhub.cli.docs_gen import layer_kernel_rows
    from kernelhub.registry.plugins import get_registry

    rows = layer_kernel_rows(get_registry())
    import textwrap

    print("\n" + textwrap.fill(f"layer kernels on this machine ({device}); 'reference' (the layer's own forward) "
                               "serves every layer:", terminal_width() or 1 << 30))
    header = ["name", "devices", "dtypes", "features", "source"]
    for layer in dict.fromkeys(row["layer"] for row in rows):
        table = [header + ["status"]]
        for row in (r for r in rows if r["layer"] == layer):
            devices = row["caps"].devices
            status = "available" if not devices or device in devices else f"unavailable: runs on {', '.join(devices)}"
            table.append([str(row[h]) for h in header] + [status])
        print(f"\n{layer}:")
        print("\n".join(format_table(table, wrap=("dtypes", "features", "source", "status"), indent="  ")))


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


def cmd_explain(args) -> int:
    import json

    from kernelhub.runtime.pretrained import explain

    if args.tp_rank is not None and args.tp is None:  # a rank means nothing without a tensor-parallel size
        raise UsageError(f"--tp-rank {args.tp_rank} needs --tp N (the number of ranks); "
                         f"example: kernelhub explain {args.model} --tp 2 --tp-rank {args.tp_rank}")
    if args.tp is not None and args.tp_rank is not None and not 0 <= args.tp_rank < args.tp:
        raise UsageError(f"--tp-rank {args.tp_rank} is not a rank of --tp {args.tp}; valid: 0..{args.tp - 1}")
    plan = explain(args.model, attn_implementation=args.attn, kernels=args.kernels, dtype=args.dtype,
                   device=args.device, mode=args.mode, lock=args.lock, tp_size=args.tp, tp_rank=args.tp_rank or 0,
                   **source_options(args))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan)
    return 0


def cmd_demo(args) -> int:
    from kernelhub.cli.demo import run_demo

    return run_demo(attn=args.attn, max_new_tokens=args.max_new_tokens)


def _tensor_parallel_group(args):
    """For `run --tp N` (or under torchrun): (exit status of N relaunched ranks, None) when started
    outside torchrun, else (None, whether this call created the process group)."""
    import subprocess

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return None, False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # start N ranks of this very command
        from kernelhub.runtime.pretrained import explain

        # every refusal a rank would meet (sizes, plan, request) as one line here, before N processes start
        explain(args.model, attn_implementation=args.attn, kernels=args.kernels, dtype=args.dtype, lock=args.lock,
                tp_size=args.tp, **source_options(args))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.tp}",
                   "-m", "kernelhub", *args.argv]
        return subprocess.call(command), False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return None, True


def cmd_run(args) -> int:
    import torch.distributed as dist

    from kernelhub.runtime.sampling import SamplingParams
    from kernelhub.runtime.pretrained import from_pretrained

    # temperature 0 means greedy here, as in most chat CLIs; bad values fail before the model loads
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=args.temperature != 0,
                              temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.tp is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun ... -m kernelhub run
        args.tp = int(os.environ["WORLD_SIZE"])
    if args.tp and args.device is not None:
        raise UsageError(f"--device {args.device} and --tp {args.tp}: under tensor parallelism each rank uses its own "
                         "device (cuda:LOCAL_RANK with NCCL, cpu with gloo); drop --device")
    if not args.tp or (args.tp == 1 and "WORLD_SIZE" not in os.environ):
        return _generate(args, sampling, from_pretrained(args.model, attn_implementation=args.attn,
                                                         kernels=args.kernels, dtype=args.dtype, lock=args.lock,
                                                         device=args.device, **source_options(args)))
    status, owned = _tensor_parallel_group(args)
    if status is not None:
        return status
    try:
        model = from_pretrained(args.model, attn_implementation=args.attn, kernels=args.kernels, dtype=args.dtype,
                                lock=args.lock, tp_plan="auto", tp_size=args.tp, **source_options(args))
        status = _generate(args, sampling, model, quiet=dist.get_rank() != 0)  # every rank computes, rank 0 prints
        # no rank tears the group down while another still uses it (gloo can abort a rank at exit otherwise)
        dist.barrier()
        return status
    finally:
        if owned:
            dist.destroy_process_group()


def _generate(args, sampling, model, quiet: bool = False) -> int:
    import time

    import torch

    from kernelhub.runtime.pretrained import load_tokenizer

    tokenizer = load_tokenizer(args.model, model=model, revision=args.revision, gguf_file=args.gguf_file)
    if not hasattr(model, "generate"):  # an encoder: show the sentence embedding
        from kernelhub.models.bert import mean_pool

        batch = {k: v.to(model.device) for k, v in tokenizer([args.prompt], return_tensors="pt").items()}
        with torch.no_grad():
            emb = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])[0]
        print(f"sentence embedding ({emb.numel()} dims): {[round(v, 4) for v in emb[:8].tolist()]} ...")
        return 0
    if tokenizer.chat_template and not args.no_chat:  # the template writes the special tokens itself
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt")["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(model.device)
    start = time.perf_counter()
    # The checkpoint's generation config (all its eos ids) wins; the tokenizer's eos is the fallback.
    eos = {} if model.generation_config.eos_token_id is not None else {"eos_token_id": tokenizer.eos_token_id}
    out = model.generate(ids, sampling=sampling, **eos)
    seconds = time.perf_counter() - start
    if quiet:
        return 0
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    new = out.shape[1] - ids.shape[1]
    print(f"\n[{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s, attention: "
          f"{', '.join(sorted(model.binding.chosen()))}]", file=sys.stderr)
    return 0


ATTN_HELP = ("attn_implementation: a name (sdpa, flex, eager, flash, paged|sdpa, org/repo@v1:fn), JSON "
             """('["flash", "sdpa"]', '{"sliding_attention": "flex", "*": "sdpa"}') or key=value pairs """
             "(sliding_attention=flex,*=sdpa); lists only in JSON")
KERNELS_HELP = ("""layer kernels as JSON ('{"RMSNorm": "org/rmsnorm@v1"}', lists allowed) or key=value pairs """
                "(RMSNorm=org/rmsnorm@v1,Linear=onednn)")


def subcommand(sub, name: str, summary: str, details: str = "", parents=()) -> argparse.ArgumentParser:
    """A subparser whose one-line `summary` shows in the parent's help and, with `details`, in its own.

    >>> parser = Parser(prog="kernelhub")
    >>> p = subcommand(parser.add_subparsers(), "hello", "say hello")
    >>> p.description
    'Say hello.'
    """
    return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + "." +
                          (f"\n\n{details}" if details else ""), formatter_class=argparse.RawDescriptionHelpFormatter,
                          parents=list(parents))


def build_parser() -> Parser:
    """The whole `kernelhub` argument parser (no heavy imports: `--help` and `--version` stay fast)."""
    from kernelhub import __version__

    parser = Parser(prog="kernelhub", description="kernelhub: pick attention and layer kernels for PyTorch "
                    "models, explain the binding, run models, lock and publish Hub kernels.")
    parser.add_argument("--version", action="version", version=f"kernelhub {__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="on failure, print the full traceback")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more: -v info (what was bound where), -vv debug")
    parser.add_argument("-q", "--quiet", action="count", default=0,
                        help="log less: -q errors only (no warnings, no progress bars), -qq critical")
    # accepted after the subcommand too; SUPPRESS keeps a subparser from resetting what came before it
    common = Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on failure, print the full traceback")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="log more: -v info, -vv debug")
    common.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS,
                        help="log less: -q errors only, -qq critical")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subcommand(sub, "backends", "list attention backends and whether they run here",
               parents=[common]).set_defaults(fn=cmd_backends)
    p = subcommand(sub, "plugins", "list loaded plugins and the ones that failed to load", parents=[common])
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed")
    p.set_defaults(fn=cmd_plugins)

    p = subcommand(sub, "explain", "print the binding plan for a checkpoint without loading weights",
                   "example: kernelhub explain ./llama --attn sliding_attention=flex,*=sdpa "
                   "--kernels RMSNorm=reference",
                   parents=[common])
    p.add_argument("model", help="checkpoint directory (config.json), .gguf file, or Hub model id org/name[@REV]")
    add_source_options(p)
    p.add_argument("--attn", type=request_type("--attn"), default=None, help=ATTN_HELP)
    p.add_argument("--kernels", type=request_type("--kernels"), default=None, help=KERNELS_HELP)
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="dtype to plan for (default: the checkpoint's); one of: %(choices)s")
    p.add_argument("--mode", default="inference", choices=MODES, help="binding mode; one of: %(choices)s")
    p.add_argument("--lock", default=None, metavar="FILE", help="verify Hub kernels against this lock file")
    p.add_argument("--json", action="store_true", help="print plan.to_dict() as JSON")
    p.add_argument("--device", type=device_type, default="cpu",
                   help="device to plan for, e.g. cuda (checked here; default: %(default)s)")
    p.add_argument("--tp", type=positive_int, default=None, metavar="N",
                   help="plan one rank of a tensor-parallel load on N ranks (no process group needed)")
    p.add_argument("--tp-rank", type=int, default=None, metavar="R",
                   help="the rank to plan, with --tp only (default: 0)")
    p.set_defaults(fn=cmd_explain)

    p = subcommand(sub, "demo", "embed sentences with MiniLM under each backend, then chat with SmolLM2",
                   parents=[common])
    p.add_argument("--attn", default="sdpa", help="attention backend for the chat part (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=48, metavar="N",
                   help="tokens to generate per answer, 1 or more (default: %(default)s)")
    p.set_defaults(fn=cmd_demo)

    p = subcommand(sub, "run", "generate from a checkpoint directory or .gguf file (an encoder prints an embedding)",
                   'example: kernelhub run model.gguf --prompt "What is the capital of France?" --attn flex',
                   parents=[common])
    p.add_argument("model", help="checkpoint directory, .gguf file, or Hub model id org/name[@REV]")
    add_source_options(p)
    p.add_argument("--prompt", required=True, help="the user message (wrapped in the chat template if any)")
    p.add_argument("--attn", type=request_type("--attn"), default=None,
                   help=ATTN_HELP + " (default: the recorded request, else sdpa)")
    p.add_argument("--kernels", type=request_type("--kernels"), default=None, help=KERNELS_HELP)
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens to generate, 1 or more (default: %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                   help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=probability, default=None, metavar="P",
                   help="sample from the smallest set with probability >= P, 0 < P <= 1")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weights dtype (default: the checkpoint's); one of: %(choices)s")
    p.add_argument("--lock", default=None, metavar="FILE", help="verify Hub kernels against this lock file")
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--device", type=device_type, default=None,
                   help="load and run on this device, e.g. cuda or cuda:1 (default: cpu; not with --tp)")
    p.add_argument("--tp", type=positive_int, default=None, metavar="N",
                   help="tensor parallel on N ranks (started under torchrun for you; gloo on CPU); rank 0 prints")
    p.set_defaults(fn=cmd_run)
    add_diff_command(sub, parents=[common])
    add_hub_commands(sub, subcommand, common)
    return parser


def _fail(message: str, status: int) -> int:
    print(f"kernelhub: error: {one_line(message)}", file=sys.stderr)
    return status


def _os_message(e: OSError) -> str:
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def main(argv=None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 failure, 2 bad input, 130 interrupted).

    >>> main(["explain"])
    2
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv  # known before parsing, so even a parse failure honours it
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help / --version printed their text
            status = e.code if isinstance(e.code, int) else 0
        else:
            args.argv = argv  # `run --tp N` starts N ranks of this same command
            if args.verbose or args.quiet:
                from kernelhub.declare.log import set_verbosity

                set_verbosity(verbosity_level(args.verbose, args.quiet))
            status = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (`| head`): point stdout at devnull so the exit-time flush is quiet too
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        return 130
    except (UsageError, KernelhubError) as e:
        if debug:
            traceback.print_exc()
            return 2
        return _fail(str(e), 2)
    except OSError as e:
        if debug:
            traceback.print_exc()
            return 1
        return _fail(_os_message(e), 1)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            traceback.print_exc()
            return 1
        return _fail(f"internal error: {type(e).__name__}: {one_line(str(e))} (run with --debug for the traceback)", 1)


if __name__ == "__main__":
    sys.exit(main())
