"""`kernelhub kernel check DIR`: is this a kernel repo others can publish, lock and bind?

It builds a scratch copy of the repo and checks, in order: the layout (build.toml,
README card, source package, tests, benchmarks), every variant's `metadata.json` as
Hugging Face `kernels` parses it, the benchmarks (each `Benchmark` class runs its first
workload once on the CPU variant, setup, benchmark and verify, as `kernels benchmark`
would; every `self.kernel.<name>` they read must exist), the `layers` contract of every
layer class (a class whose name is no declared layer fails, with the closest name), and the
numbers: each layer runs the conformance probe a bind runs, against the catalogue's reference
of the same name, in float32 and in bfloat16 when it declares it.

Every `lines` entry (printed `ok`) says what ran; `notes` say what could not be checked
and why (a workload without a verify method); `problems` fail the check.

>>> report = check_kernel("hub_kernels/rmsnorm")      # doctest: +SKIP
>>> report.ok, report.lines[-1]                        # doctest: +SKIP
(True, 'RMSNorm: conforms to kernelhub RMSNorm in bfloat16 (max err 0 (tol 0.016))')
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from kernelhub.kernel.build import build_kernel, python_name, read_build_toml
from kernelhub.declare.errors import KernelhubError, suggestion
from kernelhub.registry.layer_contract import contract_problems
from kernelhub.registry.hub.ggml_api import exposes_ggml_api, ggml_conformance
from kernelhub.registry.hub.metadata import attention_specs, read_kernel_metadata, read_variant_metadata
from kernelhub.registry.hub.snapshot import read_variant


@dataclasses.dataclass
class CheckReport:
    lines: list[str] = dataclasses.field(default_factory=list)      # checked and fine: each ran something
    problems: list[str] = dataclasses.field(default_factory=list)   # any of these fails the check
    notes: list[str] = dataclasses.field(default_factory=list)      # not checked, and why

    @property
    def ok(self) -> bool:
        return not self.problems


def reference_layers() -> dict:
    """Declared layer name -> an instance of its catalogue class, configured as models use it (the
    `like` a conformance probe copies: eps, biases, activation)."""
    from kernelhub.declare import reference_layers as catalogue

    c = catalogue
    return {"RMSNorm": c.RMSNorm(64), "GptOssRMSNorm": c.GptOssRMSNorm(64), "GemmaRMSNorm": c.GemmaRMSNorm(64),
            "LayerNorm": c.LayerNorm(64, eps=1e-12), "SiLUAndMul": c.SiLUAndMul(), "GeluTanhAndMul": c.GeluTanhAndMul(),
            "ApplyRotary": c.ApplyRotary(), "Linear": c.Linear(64, 48), "Experts": c.Experts(4, 32, 16)}


def _layout(repo: Path, report: CheckReport) -> dict:
    general = read_build_toml(repo)
    readme = repo / "README.md"
    if not readme.is_file() or not readme.read_text().startswith("---\n"):
        report.problems.append("README.md must exist and start with a '---' YAML front-matter card")
    if not any((repo / "tests").glob("test_*.py")):
        report.problems.append("tests/ has no test_*.py")
    if not (repo / "benchmarks" / "benchmark.py").is_file():
        report.problems.append("benchmarks/benchmark.py is missing (the kernels Benchmark format)")
    report.lines.append(f"layout: {general['name']} v{general['version']}, backends {', '.join(general['backends'])}")
    return general


def _workloads(cls) -> list[str]:
    """A Benchmark class's workload names (benchmark_<name>), in the order the class defines them."""
    names = []
    for klass in reversed(cls.__mro__):
        names += [n.removeprefix("benchmark_") for n in vars(klass) if n.startswith("benchmark_")
                  and callable(getattr(cls, n)) and n.removeprefix("benchmark_") not in names]
    return names


def _kernel_names(path: Path) -> set[str]:
    """Every `self.kernel.<name>` the benchmark file reads."""
    import ast

    def reads_self_kernel(node) -> bool:
        inner = node.value
        return isinstance(inner, ast.Attribute) and inner.attr == "kernel" and isinstance(inner.value, ast.Name) \
            and inner.value.id == "self"

    return {node.attr for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Attribute) and reads_self_kernel(node)}


def _run_workload(cls, workload: str, kernel) -> str:
    """Run one workload as `kernels benchmark` does, once, on the CPU: setup, benchmark, verify.
    Returns what was checked; raises with what went wrong."""
    instance = cls()
    instance.kernel, instance.device = kernel, "cpu"
    if instance.seed is not None:
        torch.manual_seed(instance.seed)
    getattr(instance, f"setup_{workload}", instance.setup)()
    getattr(instance, f"benchmark_{workload}")()
    verify = getattr(instance, f"verify_{workload}", None)
    if verify is None:
        return f"{cls.__name__}.{workload} ran (it has no verify_{workload}: its output is not checked)"
    want = verify()
    if not isinstance(instance.out, torch.Tensor) or not isinstance(want, torch.Tensor):
        raise AssertionError(f"benchmark_{workload} must set self.out and verify_{workload} return a tensor "
                             f"(got {type(instance.out).__name__} and {type(want).__name__})")
    if instance.out.shape != want.shape:
        raise AssertionError(f"self.out has shape {tuple(instance.out.shape)}, verify_{workload} returns "
                             f"{tuple(want.shape)}")
    diff = float((instance.out.float() - want.float()).abs().max()) if want.numel() else 0.0
    if not torch.allclose(instance.out, want, atol=1e-2):  # the rule `kernels benchmark` applies
        raise AssertionError(f"self.out differs from verify_{workload} by {diff:.3g} (kernels benchmark allows "
                             "atol=1e-2)")
    return f"{cls.__name__}.{workload} matches verify_{workload} (max abs diff {diff:.1e})"


def _benchmark(repo: Path, report: CheckReport, kernel) -> None:
    """Each Benchmark class runs its first workload once against its verify method; every workload's
    `self.kernel.<name>` must exist in the kernel (the other workloads' sizes are for real devices)."""
    path = repo / "benchmarks" / "benchmark.py"
    if not path.is_file():
        return
    from kernels.benchmark import Benchmark
    spec = importlib.util.spec_from_file_location("_kernelhub_checked_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - report any failure of the user's file
        report.problems.append(f"benchmarks/benchmark.py does not import: {type(e).__name__}: {e}")
        return
    found = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, Benchmark) and v is not Benchmark]
    if not found:
        report.problems.append("benchmarks/benchmark.py defines no kernels.benchmark.Benchmark subclass")
        return
    missing = sorted(name for name in _kernel_names(path) if not hasattr(kernel, name))
    if missing:
        report.problems.append(f"benchmarks/benchmark.py calls self.kernel.{', self.kernel.'.join(missing)}, which "
                               f"the kernel does not define (it has: {', '.join(_public(kernel))})")
    for cls in found:
        workloads = _workloads(cls)
        if not workloads:
            report.notes.append(f"benchmarks: {cls.__name__} defines no benchmark_* workload: nothing ran")
            continue
        try:
            done = _run_workload(cls, workloads[0], kernel)
        except Exception as e:  # noqa: BLE001 - report any failure of the user's workload
            report.problems.append(f"benchmarks: {cls.__name__}.{workloads[0]} fails on cpu: {type(e).__name__}: {e}")
            continue
        rest = f"; not run here: {', '.join(workloads[1:])}" if len(workloads) > 1 else ""
        (report.lines if "matches" in done else report.notes).append(f"benchmarks: {done}{rest}")


def _public(module) -> list[str]:
    return sorted(n for n in vars(module) if not n.startswith("_"))


def _numbers(name, impl, like, report: CheckReport) -> None:
    """The conformance probe a bind runs, in float32 and in each other dtype the kernel declares."""
    from kernelhub.registry.conformance import check_layer

    declared = getattr(impl, "dtypes", None) or (torch.float32, torch.bfloat16)
    for dtype in [torch.float32, *(d for d in (torch.bfloat16, torch.float16) if d in declared)]:
        verdict = check_layer(impl.forward, like, dtype, torch.device("cpu"))
        if verdict.ok:
            report.lines.append(f"{name}: conforms to kernelhub {name} in {str(dtype)[6:]} ({verdict.note()})")
        else:
            report.problems.append(f"{name}: {verdict.reason()}")


def _attention_numbers(module, symbol, spec, report):
    """A declared attention function against kernelhub's eager reference on a small causal GQA case."""
    from kernelhub.declare.attention_mask import AttentionMask
    from kernelhub.declare.eager import eager_attention
    from kernelhub.backends.flash_style import flash_varlen_attention

    fn = getattr(module, symbol, None)
    if not callable(fn):
        report.problems.append(f"kernelhub.json declares attention function {symbol!r}, which the kernel lacks")
        return
    if spec.mask_format == "varlen":
        fn = flash_varlen_attention(fn)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 32, generator=g)
    k, v = torch.randn(2, 2, 7, 32, generator=g), torch.randn(2, 2, 7, 32, generator=g)
    mask = AttentionMask.build(batch=2, q_len=7)
    try:
        got, _ = fn(None, q, k, v, mask.materialize(spec.mask_format) if spec.mask_format != "none" else None,
                    scaling=32 ** -0.5)
    except Exception as e:  # noqa: BLE001 - report any failure
        report.problems.append(f"{symbol}: fails on a causal float32 case: {type(e).__name__}: {e}")
        return
    diff = float((got - eager_attention(None, q, k, v, mask.materialize("bool"), scaling=32 ** -0.5)[0]).abs().max())
    if diff > 1e-5:
        report.problems.append(f"{symbol}: differs from kernelhub eager attention by {diff:.2e} (> 1e-5 in float32)")
    else:
        report.lines.append(f"{symbol}: matches kernelhub eager attention (max abs diff {diff:.1e})")


def check_kernel(repo) -> CheckReport:
    """Validate a kernel repo; `report.problems` is empty when it is ready to publish."""
    from kernels import get_local_kernel
    from kernels._rust import Metadata

    repo, report = Path(repo), CheckReport()
    general = _layout(repo, report)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / repo.name
        shutil.copytree(repo, scratch, ignore=shutil.ignore_patterns("build", "__pycache__", "*.pyc"))
        specs, failed = {}, len(report.problems)
        for variant in build_kernel(scratch):
            try:
                Metadata.read_from_file(variant / "metadata.json")
                snapshot = read_variant(variant)
                read_variant_metadata(snapshot.files, str(variant))
                specs = attention_specs(read_kernel_metadata(snapshot.files, str(variant)), variant.name)
            except (ValueError, KernelhubError) as e:
                report.problems.append(f"{variant.name}: {e}")
        if len(report.problems) == failed:  # an ok line only for what did parse
            report.lines.append(f"metadata: {len(general['backends'])} variants parse with kernels")
        try:
            module = get_local_kernel(scratch, backend="cpu")
        except Exception as e:  # noqa: BLE001 - report any import failure
            report.problems.append(f"the cpu variant does not import: {type(e).__name__}: {e}")
            return report
        _benchmark(repo, report, module)
        for symbol, spec in sorted(specs.items()):
            _attention_numbers(module, symbol, spec, report)
        layers = getattr(module, "layers", None)
        if layers is None and exposes_ggml_api(module):  # transformers' GGUF API: served as QuantizedLinear
            lines, problems = ggml_conformance(module)
            report.lines.extend(lines)
            report.problems.extend(problems)
            return report
        if layers is None:
            if not specs:
                report.problems.append(f"{python_name(general['name'])} has no `layers` module and declares no "
                                       "attention function in kernelhub.json")
            return report
        references = reference_layers()
        for name, impl in sorted(vars(layers).items()):
            is_layer = isinstance(impl, type) and issubclass(impl, torch.nn.Module)
            if not is_layer or impl.__module__ != layers.__name__:
                continue
            if name not in references:  # a bind would never reach it: layer names are the contract
                report.problems.append(f"layers.{name} matches no declared layer.{suggestion(name, references)} "
                                       f"Declared layers: {', '.join(sorted(references))}")
                continue
            declared = type(references[name])
            problems = contract_problems(impl, declared, hub=True)
            report.problems.extend(f"{name}: {p}" for p in problems)
            if not problems:
                _numbers(name, impl, references[name], report)
    return report
