"""Test setup: hermetic registry, uncompiled flex by default, one inductor cache per run."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("KERNELHUB_DISABLE_PLUGIN_AUTOLOAD", "1")
os.environ.setdefault("KERNELHUB_FLEX_COMPILE", "0")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kernelhub-inductor-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

import kernelhub  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_registry():
    """Every test gets its own registry: registrations never leak between tests."""
    with kernelhub.scoped_registry(fresh=True, autoload=False) as reg:
        yield reg


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random 4-layer Llama checkpoint in the Hugging Face layout, shared by the whole run."""
    from kernelhub.testing.samples import write_random_checkpoint

    path = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def hub_kernels_built():
    """Every kernel in hub_kernels/ built in place once, as `kernelhub kernel build DIR` leaves it
    (build/ folders are not committed): tests bind them as local kernels in any order."""
    from filelock import FileLock

    from kernelhub.kernel.build import build_kernel
    from tests.hub_test_kernels import HUB_KERNELS

    # Under pytest-xdist the workers share the tree: the first builds while the others wait, and a
    # worker never rebuilds (deletes) what another is already using.
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    done = Path(tempfile.gettempdir()) / f"kernelhub-hub-kernels-{run}.built"
    with FileLock(str(Path(tempfile.gettempdir()) / "kernelhub-hub-kernels.lock")):
        if run and done.exists():
            return
        for kernel in sorted(HUB_KERNELS.iterdir()):
            if (kernel / "build.toml").is_file():
                build_kernel(kernel)
        if run:
            done.touch()


@pytest.fixture(scope="session")
def loopback_hub(tmp_path_factory):
    """olah on loopback serving our hub_kernels and the test kernels as git repos (org kernelhub-test)."""
    from tests.hub_test_kernels import ORG, build_all
    from tests.loopback_hub import LoopbackHub

    root = tmp_path_factory.mktemp("hub")
    server = LoopbackHub(root / "server").start()
    server.repos = build_all(root / "sources")
    server.commits = {name: server.publish(f"{ORG}/{name}", path) for name, path in server.repos.items()}
    yield server
    server.stop()


@pytest.fixture
def hub(loopback_hub, monkeypatch, tmp_path):
    """The loopback Hub as this test's endpoint, an empty HF cache, and the test org trusted."""
    from kernelhub.registry.hub.loader import forget_loaded
    from kernelhub.testing import point_hub_at

    point_hub_at(monkeypatch, loopback_hub.endpoint, tmp_path / "hf-cache")
    monkeypatch.setenv("KERNELHUB_TRUSTED", "kernelhub-test")
    yield loopback_hub
    forget_loaded()


@pytest.fixture
def marker(tmp_path):
    """Where a malicious kernel in a supply-chain test writes when it runs: it must stay absent."""
    return tmp_path / "MARKER"


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
