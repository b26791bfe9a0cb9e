"""Which Hub kernel repos may run code in this process.

A repo is trusted when its org or its full id is on the allowlist, gathered from:

    built in                 kernels-community
    config file              trusted = ["my-org", "other-org/one-kernel"]   in
                             $KERNELHUB_CONFIG or ~/.config/kernelhub/config.toml
    environment              KERNELHUB_TRUSTED="my-org,other-org/one-kernel"   ("*" trusts all)

The check runs before anything from the repo is downloaded or imported. Local kernel
directories are trusted: the user pointed at them. A kernel's dependencies
(`kernel-depends` in its metadata.json) pass the same check, whoever publishes them:
kernelhub never defers to the Hub's publisher flag.

>>> import os; os.environ["KERNELHUB_TRUSTED"] = "my-org"
>>> is_trusted("my-org/rmsnorm"), is_trusted("stranger/rmsnorm")
(True, False)
>>> del os.environ["KERNELHUB_TRUSTED"]
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from kernelhub.declare.errors import TrustConfigError, UntrustedKernelError
from kernelhub.declare.json_limits import read_capped

BUILT_IN = ("kernels-community",)
ENV = "KERNELHUB_TRUSTED"
CONFIG_ENV = "KERNELHUB_CONFIG"
MAX_CONFIG_BYTES = 1 << 20  # an allowlist is a few lines



def config_path() -> Path:
    return Path(os.environ.get(CONFIG_ENV) or Path.home() / ".config" / "kernelhub" / "config.toml")


def _from_config() -> list[str]:
    path = config_path()
    if not os.path.exists(path):  # no config file: the built-ins and the environment only
        return []
    where = f"the kernelhub config {str(path)!r}"
    data = read_capped(path, where, TrustConfigError, max_bytes=MAX_CONFIG_BYTES)
    try:
        entries = tomllib.loads(data.decode("utf-8")).get("trusted", [])
    except UnicodeDecodeError as e:
        raise TrustConfigError(f"{where} is not UTF-8 text (byte {e.start}); save it as UTF-8 TOML with "
                               "trusted = [\"my-org\"]") from None
    except RecursionError:  # tomllib recurses once per nested array
        raise TrustConfigError(f"{where} nests arrays too deeply to read; expected trusted = [\"my-org\"]") from None
    except tomllib.TOMLDecodeError as e:
        raise TrustConfigError(f"cannot read {where}: {e}; expected TOML such as trusted = [\"my-org\"]") from None
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise TrustConfigError(f"{str(path)!r}: 'trusted' must be a list of strings like [\"my-org\"]")
    return entries


def trusted_sources() -> list[str]:
    """Every allowlist entry in effect, built-ins first."""
    env = [e.strip() for e in os.environ.get(ENV, "").split(",") if e.strip()]
    return [*BUILT_IN, *_from_config(), *env]


def is_trusted(repo_id: str) -> bool:
    sources = trusted_sources()
    return "*" in sources or repo_id in sources or repo_id.split("/")[0] in sources


def check_trusted(repo_id: str, chain: tuple[str, ...] = ()) -> None:
    """Raise `UntrustedKernelError` naming the exact setting to change, unless trusted.

    `chain` is how the repo was reached ('org/a@v1', ..., 'stranger/b@v1') when it is a
    dependency of another kernel: the message shows the whole path, so the user sees who
    pulled it in.
    """
    if is_trusted(repo_id):
        return
    org = repo_id.split("/")[0]
    path = " -> ".join(chain) + ": not trusted; " if chain else ""
    raise UntrustedKernelError(
        f"{path}kernel repo {repo_id!r} is not trusted, so none of its code"
        f"{' (nor of the kernels that depend on it)' if chain else ''} was downloaded or imported. "
        f"Trusted: {', '.join(trusted_sources())}. To trust it, set {ENV}={org} (or {ENV}={repo_id} "
        f"for this repo only), or add \"{org}\" to trusted = [...] in {config_path()}")
