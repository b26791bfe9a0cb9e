"""Environment for every test under this repository (tests/, contrib/, hub_kernels/).

Set before anything imports triton or huggingface_hub: Triton kernels run on CPU through
the interpreter, and no test can reach the real Hub or touch the user's HF cache.
"""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"  # the discard port: closed, so a stray request fails fast
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="kernelhub-test-hf-")
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ.pop("KERNELHUB_TRUSTED", None)
os.environ.pop("KERNELHUB_LOCK", None)
os.environ["KERNELHUB_CACHE"] = os.path.join(os.environ["HF_HOME"], "kernelhub")  # verified kernel copies
os.environ.pop("KERNELHUB_HUB_TIMEOUT", None)
os.environ["KERNELHUB_CONFIG"] = os.path.join(os.environ["HF_HOME"], "no-kernelhub-config.toml")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# CLI tables wrap to $COLUMNS; tests read them as a pipe does (pytest-xdist's workers set COLUMNS=80)
os.environ.pop("COLUMNS", None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: two threads each would oversubscribe the cores, and torch's
    # threads spin while they wait. Subprocesses a test starts keep torch's default.
    import torch

    torch.set_num_threads(1)
