"""`kernelhub kernel check DIR`: is this a kernel repo others can publish, lock and bind?

It builds a scratch copy of the repo and checks, in order: the layout (build.toml,
README card, source package, tests, benchmarks), every variant's `metadata.json` as
Hugging Face `kernels` parses it, the `layers` contract of every layer class, and the
numbers: each layer runs on a kernelhub reference module of the same name and must
match that module's own forward (float32, 1e-5).

>>> report = check_kernel("hub_kernels/rmsnorm")      # doctest: +SKIP
>>> report.ok, report.lines[-1]                        # doctest: +SKIP
(True, 'RMSNorm: matches kernelhub RMSNorm (max abs diff 2.4e-07)')
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from kernelhub.declare.layer import set_layer_forward
from kernelhub.kernel.build import build_kernel, python_name, read_build_toml
from kernelhub.declare.errors import KernelhubError
from kernelhub.registry.layer_contract import contract_problems
from kernelhub.registry.hub.metadata import attention_specs, read_kernel_metadata, read_variant_metadata
from kernelhub.registry.hub.snapshot import read_variant


@dataclasses.dataclass
class CheckReport:
    lines: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def reference_layers() -> dict:
    """Declared layer name -> (host module with random state, example inputs), float32."""
    from kernelhub.declare.experts import Experts
    from kernelhub.models.bert import LayerNorm
    from kernelhub.models.llama import ApplyRotary, RMSNorm, SiLUAndMul

    g = torch.Generator().manual_seed(0)
    rms = RMSNorm(64, eps=1e-6)
    rms.weight.data = torch.rand(64, generator=g) + 0.5
    ln = LayerNorm(48, eps=1e-12)
    ln.weight.data, ln.bias.data = torch.rand(48, generator=g) + 0.5, torch.randn(48, generator=g)
    angles = torch.randn(2, 5, 8, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q, k = torch.randn(2, 5, 4, 16, generator=g).transpose(1, 2), torch.randn(2, 5, 2, 16, generator=g).transpose(1, 2)
    experts = Experts(4, 32, 16)  # plain silu experts: what every Experts kernel serves
    experts.gate_up_proj.data = torch.randn(4, 32, 32, generator=g) / 6
    experts.down_proj.data = torch.randn(4, 32, 16, generator=g) / 4
    routed = (torch.randn(6, 32, generator=g), torch.tensor([[0, 1], [1, 3], [3, 0], [0, 1], [1, 0], [3, 1]]),
              torch.rand(6, 2, generator=g))
    return {"Experts": (experts, routed),
            "RMSNorm": (rms, (torch.randn(2, 3, 64, generator=g),)),
            "SiLUAndMul": (SiLUAndMul(), (torch.randn(2, 3, 96, generator=g),)),
            "LayerNorm": (ln, (torch.randn(2, 3, 48, generator=g) * 3 + 1,)),
            "ApplyRotary": (ApplyRotary(), (q, k, cos, sin))}


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


def _benchmark(repo: Path, report: CheckReport) -> None:
    path = repo / "benchmarks" / "benchmark.py"
    if not path.is_file():
        return
    from kernels.benchmark import Benchmark
    spec = importlib.util.spec_from_file_location("_kernelhub_checked_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found = [n for n, v in vars(module).items()
             if isinstance(v, type) and issubclass(v, Benchmark) and v is not Benchmark]
    if not found:
        report.problems.append("benchmarks/benchmark.py defines no kernels.benchmark.Benchmark subclass")
    else:
        report.lines.append(f"benchmarks: {', '.join(found)}")


def _numbers(name, impl, reference, report: CheckReport) -> None:
    host, inputs = reference
    with torch.no_grad():
        want = host(*inputs)
        set_layer_forward(host, impl.forward)
        got = host(*inputs)
    want, got = (want, got) if isinstance(want, tuple) else ((want,), (got,))
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want))
    if diff > 1e-5:
        report.problems.append(f"{name}: differs from kernelhub {name} by {diff:.2e} (> 1e-5 in float32)")
    else:
        report.lines.append(f"{name}: matches kernelhub {name} (max abs diff {diff:.1e})")


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
    _benchmark(repo, report)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp) / repo.name
        shutil.copytree(repo, scratch, ignore=shutil.ignore_patterns("build", "__pycache__", "*.pyc"))
        specs = {}
        for variant in build_kernel(scratch):
            try:
                Metadata.read_from_file(variant / "metadata.json")
                snapshot = read_variant(variant)
                read_variant_metadata(snapshot.files, str(variant))
                specs = attention_specs(read_kernel_metadata(snapshot.files, str(variant)), variant.name)
            except (ValueError, KernelhubError) as e:
                report.problems.append(f"{variant.name}: {e}")
        report.lines.append(f"metadata: {len(general['backends'])} variants parse with kernels")
        try:
            module = get_local_kernel(scratch, backend="cpu")
        except Exception as e:  # noqa: BLE001 - report any import failure
            report.problems.append(f"the cpu variant does not import: {type(e).__name__}: {e}")
            return report
        for symbol, spec in sorted(specs.items()):
            _attention_numbers(module, symbol, spec, report)
        layers = getattr(module, "layers", None)
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
            if name not in references:
                report.lines.append(f"{name}: no kernelhub layer of that name to compare with (declared: "
                                    f"{', '.join(sorted(references))})")
                continue
            declared = type(references[name][0])
            problems = contract_problems(impl, declared, hub=True)
            report.problems.extend(f"{name}: {p}" for p in problems)
            if not problems:
                _numbers(name, impl, references[name], report)
    return report
