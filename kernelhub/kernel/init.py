"""`kernelhub kernel init DIR --layer RMSNorm`: a complete kernel repo to start from.

It writes what `kernel build | check | publish` expect (the layout of `hub_kernels/rmsnorm`),
for one declared layer, with a PyTorch forward that already passes `kernel check`:

    DIR/
      build.toml                      name (DIR's name), version 1, license, backends cpu and cuda
      README.md                       the Hub card (YAML front matter)
      .gitignore                      caches (publish and build skip them anyway; build/ is published)
      torch-ext/<name>/__init__.py    exports `layers` and the functions
      torch-ext/<name>/_ops.py        `reference_<fn>` (kernelhub's math) and `<fn>` (your kernel)
      torch-ext/<name>/layers.py      `layers.<Layer>`: the Hugging Face `kernels` layer contract
      tests/test_<name>.py            the kernel against its reference, float32 and bfloat16
      benchmarks/benchmark.py         `kernels.benchmark.Benchmark` workloads with verify methods

Make `<fn>` in `_ops.py` fast (Triton, or anything torch runs), keep `reference_<fn>` as it is,
and the test, the benchmark's verify and `kernel check` tell you when it is wrong.

>>> import tempfile, pathlib
>>> repo = init_kernel(pathlib.Path(tempfile.mkdtemp()) / "my-rmsnorm", "RMSNorm")
>>> sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file())[:4]
['.gitignore', 'README.md', 'benchmarks/benchmark.py', 'build.toml']
"""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

from kernelhub.declare.errors import KernelhubError, closest_first
from kernelhub.kernel.build import python_name


@dataclasses.dataclass(frozen=True)
class Template:
    """What differs between layers: the function, its reference, the layer's call, test and benchmark inputs."""

    function: str      # the kernel's function name
    params: str        # its parameters, annotated
    returns: str       # its return annotation
    summary: str       # one line: what it computes
    reference: str     # the reference body (kernelhub's math)
    kernel: str        # the starting kernel body (plain PyTorch)
    forward: str       # the layer's forward parameters, annotated
    call: str          # how the layer calls the function with the host module's state
    host: str          # the host module's attributes the layer reads (for docs)
    host_state: str    # a host for tests: SimpleNamespace(...) arguments, `dtype` and `hidden` in scope
    inputs: str        # the forward's inputs for tests: a tuple, `dtype` and `hidden` in scope
    args: str          # the function's arguments from `host` and the inputs `x...`
    outputs: int = 1   # how many tensors the function returns


RMSNORM = Template(
    "rms_norm", "x: torch.Tensor, weight: torch.Tensor, eps: float", "torch.Tensor",
    "weight * (x / rms(x)).to(x.dtype), statistics in float32",
    "h = x.to(torch.float32)\nreturn weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)",
    "h = x.to(torch.float32)\nvariance = h.pow(2).mean(-1, keepdim=True)\n"
    "return weight * (h * torch.rsqrt(variance + eps)).to(x.dtype)",
    "x: torch.Tensor", "rms_norm(x, self.weight, self.variance_epsilon)", "`weight` and `variance_epsilon`",
    "weight=(torch.rand(hidden) + 0.5).to(dtype), variance_epsilon=1e-6",
    "(torch.randn(rows, hidden, dtype=dtype),)", "x[0], host.weight, host.variance_epsilon")

LAYERNORM = Template(
    "layer_norm", "x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float",
    "torch.Tensor", "(x - mean) / sqrt(var + eps) * weight + bias over the last dimension (nn.LayerNorm)",
    "return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)",
    "h = x.to(torch.float32)\nmean = h.mean(-1, keepdim=True)\nvariance = (h - mean).pow(2).mean(-1, keepdim=True)\n"
    "y = (h - mean) * torch.rsqrt(variance + eps)\nif weight is not None:\n    y = y * weight.to(torch.float32)\n"
    "if bias is not None:\n    y = y + bias.to(torch.float32)\nreturn y.to(x.dtype)",
    "x: torch.Tensor", "layer_norm(x, self.weight, self.bias, self.variance_epsilon)",
    "`weight`, `bias` (may be None) and `variance_epsilon`",
    "weight=(torch.rand(hidden) + 0.5).to(dtype), bias=torch.randn(hidden).to(dtype), variance_epsilon=1e-5",
    "(3 * torch.randn(rows, hidden, dtype=dtype) + 1,)", "x[0], host.weight, host.bias, host.variance_epsilon")

SILU_AND_MUL = Template(
    "silu_and_mul", "x: torch.Tensor", "torch.Tensor", "silu(x[..., :d]) * x[..., d:], d = x.shape[-1] // 2",
    "d = x.shape[-1] // 2\nreturn torch.nn.functional.silu(x[..., :d]) * x[..., d:]",
    "gate, up = x.chunk(2, dim=-1)\nreturn gate * torch.sigmoid(gate) * up",
    "x: torch.Tensor", "silu_and_mul(x)", "nothing (it is stateless)", "",
    "(torch.randn(rows, 2 * hidden, dtype=dtype),)", "x[0]")

APPLY_ROTARY = Template(
    "apply_rotary",
    "q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor", "tuple[torch.Tensor, torch.Tensor]",
    "rotate-half rotary embedding of q, k [B, H, S, D] by cos, sin [B, S, D]",
    "cos, sin = cos[:, None], sin[:, None]\n\n"
    "def rotate_half(t):\n    half = t.shape[-1] // 2\n"
    "    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)\n\n"
    "return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin",
    "cos, sin = cos[:, None], sin[:, None]\nout = []\nfor t in (q, k):\n    first, second = t.chunk(2, dim=-1)\n"
    "    rotated = torch.cat((-second, first), dim=-1)\n    out.append(t * cos + rotated * sin)\nreturn out[0], out[1]",
    "q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor",
    "apply_rotary(q, k, cos, sin)", "nothing (it is stateless)", "",
    "rotary_inputs(rows, hidden, dtype)", "x[0], x[1], x[2], x[3]", outputs=2)

TEMPLATES = {"RMSNorm": RMSNORM, "LayerNorm": LAYERNORM, "SiLUAndMul": SILU_AND_MUL, "ApplyRotary": APPLY_ROTARY}
_NAME = re.compile(r"^[a-z][a-z0-9-]*[a-z0-9]$")  # what Hugging Face `kernels` accepts in metadata.json

ROTARY_INPUTS = '''

def rotary_inputs(rows, hidden, dtype):
    """q [1, 4, rows, 64], k [1, 2, rows, 64], cos and sin [1, rows, 64]."""
    dim = 64
    angles = torch.arange(rows)[:, None] * torch.linspace(0.01, 1.0, dim // 2)[None]
    angles = torch.cat((angles, angles), dim=-1)[None]
    return (torch.randn(1, 4, rows, dim, dtype=dtype), torch.randn(1, 2, rows, dim, dtype=dtype),
            angles.cos().to(dtype), angles.sin().to(dtype))
'''


def _indent(code: str, spaces: int) -> str:
    return textwrap.indent(code, " " * spaces)


def _ops(t: Template, name: str, layer: str) -> str:
    return f'''"""{name}: `{t.function}` (the kernel) and `reference_{t.function}` (the math it must match).

`reference_{t.function}` is kernelhub's `{layer}`; keep it as it is. Make `{t.function}` fast: fuse
it, write it in Triton (`hub_kernels/rmsnorm/torch-ext/rmsnorm/_ops.py` in the kernelhub
repository shows a Triton kernel with a PyTorch path for devices without Triton, registered
as a `torch.library` custom op so models using it still compile), or anything torch runs.
`tests/` and `kernelhub kernel check` compare the two.
"""

import torch


def reference_{t.function}({t.params}) -> {t.returns}:
    """{t.summary}."""
{_indent(t.reference, 4)}


def {t.function}({t.params}) -> {t.returns}:
    """The kernel: {t.summary}."""
{_indent(t.kernel, 4)}
'''


def _layers(t: Template, layer: str) -> str:
    return f'''"""The Hugging Face `kernels` layer contract: stateless classes that replace the forward of a
host module and read its state ({t.host})."""

import torch

from ._ops import {t.function}


class {layer}(torch.nn.Module):
    """Replaces the forward of kernelhub's `{layer}`."""

    has_backward = True        # plain PyTorch ops: autograd flows; set False for a forward-only kernel
    can_torch_compile = True   # plain PyTorch ops compile; a Triton kernel must be a torch.library op

    def forward(self, {t.forward}):
        return {t.call}
'''


def _init(t: Template) -> str:
    return f'''from . import layers
from ._ops import {t.function}, reference_{t.function}

__all__ = ["layers", "{t.function}", "reference_{t.function}"]
'''


def _test(t: Template, name: str, layer: str) -> str:
    py = python_name(name)
    flatten = "outputs if isinstance(outputs, tuple) else (outputs,)"
    return f'''"""The kernel against its PyTorch reference (run: python -m pytest tests)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch-ext"))
import {py}  # noqa: E402
from {py} import layers  # noqa: E402

TOLERANCE = {{torch.float32: 1e-5, torch.bfloat16: 1.6e-2}}  # bfloat16: about two ulps


def tensors(outputs):
    return {flatten}
{ROTARY_INPUTS if t is APPLY_ROTARY else ""}

def case(dtype, rows=5, hidden=64):
    torch.manual_seed(0)
    host = SimpleNamespace({t.host_state})  # the module whose forward the layer replaces
    return host, {t.inputs}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(dtype):
    host, x = case(dtype)
    got, want = {py}.{t.function}({t.args}), {py}.reference_{t.function}({t.args})
    for a, b in zip(tensors(got), tensors(want)):
        torch.testing.assert_close(a, b, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_layer_reads_the_host_module():
    host, x = case(torch.float32)
    got, want = layers.{layer}.forward(host, *x), {py}.reference_{t.function}({t.args})
    for a, b in zip(tensors(got), tensors(want)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_backward_matches_reference():
    host, x = case(torch.float32)
    x = tuple(t.clone().requires_grad_() for t in x)
    grads = []
    for fn in ({py}.{t.function}, {py}.reference_{t.function}):
        out = sum(t.sum() for t in tensors(fn({t.args})))
        grads.append(torch.autograd.grad(out, x))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
'''


def _benchmark(t: Template, layer: str) -> str:
    out = "torch.cat([t.flatten() for t in {}])" if t.outputs > 1 else "{}"
    call = f"self.kernel.{t.function}({t.args.replace('host.', 'self.host.').replace('x[', 'self.x[')})"
    ref = call.replace(f"self.kernel.{t.function}", f"self.kernel.reference_{t.function}")
    host = f"SimpleNamespace({t.host_state})"
    return f'''"""`kernels benchmark` workloads: the kernel, and (verify_*) the reference it must match.

`kernelhub kernel check` runs every workload's benchmark and verify once on the CPU.
"""

from types import SimpleNamespace

import torch
from kernels.benchmark import Benchmark
{ROTARY_INPUTS if t is APPLY_ROTARY else ""}

class {layer}Benchmark(Benchmark):
    seed = 0

    def _setup(self, rows, hidden):
        dtype = torch.bfloat16 if self.device != "cpu" else torch.float32
        host = {host}
        self.host = SimpleNamespace(**{{k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                                      for k, v in vars(host).items()}})
        self.x = tuple(t.to(self.device) for t in {t.inputs})

    def setup_small(self):
        self._setup(64, 1024)

    def benchmark_small(self):
        self.out = {out.format(call)}

    def verify_small(self):
        return {out.format(ref)}

    def setup_large(self):
        self._setup(4096, 4096)

    def benchmark_large(self):
        self.out = {out.format(call)}

    def verify_large(self):
        return {out.format(ref)}
'''


def _readme(t: Template, name: str, layer: str) -> str:
    py = python_name(name)
    return f'''---
license: apache-2.0
tags:
  - kernel
  - kernelhub
---

# {name}

A `{layer}` kernel for kernelhub and Hugging Face `kernels`: {t.summary}.

```python
import kernelhub

model = kernelhub.from_pretrained("path/to/model", kernels={{"{layer}": "<org>/{name}@v1"}})
```

- `{py}.{t.function}`: the kernel; `{py}.reference_{t.function}`: the PyTorch reference it matches.
- `layers.{layer}`: the `kernels` layer contract; reads {t.host} from the host module.
'''


GITIGNORE = """# Caches: `kernelhub kernel build` and `publish` skip these (and anything else listed here) anyway.
__pycache__/
*.pyc
.pytest_cache/
.venv/
# build/ is not listed: `kernelhub kernel publish` uploads the variants it builds there.
"""


def _suggested_name(name: str) -> str:
    """`name` made valid: lowercase, '_' and other characters as '-', CamelCase split.

    >>> _suggested_name("My_RMSNorm2")
    'my-rmsnorm2'
    """
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z][a-z])", "-", name).lower()
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    text = text if text[:1].isalpha() else f"kernel-{text}".rstrip("-")
    return text or "my-kernel"


def init_kernel(path, layer: str, *, backends=("cpu", "cuda")) -> Path:
    """Write a new kernel repo for declared layer `layer` at `path` (which must not exist or be
    empty); its name is the folder's name. Returns the repo path."""
    repo = Path(path)
    name = repo.name
    if layer not in TEMPLATES:
        raise KernelhubError(f"kernel init: no template for layer {layer!r}; templates: "
                             f"{', '.join(closest_first(layer, TEMPLATES))}")
    if not _NAME.match(name) or "--" in name:
        raise KernelhubError(f"kernel init: {name!r} cannot name a kernel: Hugging Face kernels takes lowercase "
                             "letters, digits and single dashes, starting with a letter and not ending with a dash, "
                             f"like {_suggested_name(name)!r} (the folder's name is the kernel's name; with '_' for "
                             "'-' it is the Python package's)")
    if repo.exists() and (not repo.is_dir() or any(repo.iterdir())):
        raise KernelhubError(f"kernel init: {str(repo)!r} already exists and is not an empty folder; "
                             "choose a new folder")
    t, py = TEMPLATES[layer], python_name(name)
    files = {
        "build.toml": (f"# Read by `kernelhub kernel build`: one source (torch-ext/{py}), one variant per backend.\n"
                       f'[general]\nname = "{name}"\nversion = 1\nlicense = "Apache-2.0"\n'
                       f"backends = [{', '.join(repr(b).replace(chr(39), chr(34)) for b in backends)}]\n"
                       "python-depends = []\n"),
        "README.md": _readme(t, name, layer),
        ".gitignore": GITIGNORE,
        f"torch-ext/{py}/__init__.py": _init(t),
        f"torch-ext/{py}/_ops.py": _ops(t, name, layer),
        f"torch-ext/{py}/layers.py": _layers(t, layer),
        f"tests/test_{py}.py": _test(t, name, layer),
        "benchmarks/benchmark.py": _benchmark(t, layer),
    }
    for rel, text in files.items():
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return repo
