"""Test setup: hermetic registry, uncompiled flex by default, one inductor cache per run."""

import os
import tempfile

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
    from kernelhub.samples import write_random_checkpoint

    path = tmp_path_factory.mktemp("tiny")
    write_random_checkpoint(path)
    return path


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
