"""Errors kernelhub raises. Each message names the thing, says why, and lists valid choices.

All derive from `KernelhubError`, itself a `ValueError`, so callers that already catch
bad-argument errors keep working.
"""

import difflib


class KernelhubError(ValueError):
    """Base class for every error kernelhub raises on bad input."""


class UnknownBackendError(KernelhubError):
    """An attention implementation name that no registered backend or alias matches."""


class BindError(KernelhubError):
    """A binding request that cannot be satisfied; the model keeps its previous binding."""


class RegistrationError(KernelhubError):
    """A backend or kernel that cannot be registered as given."""


class HubKernelError(KernelhubError):
    """A Hub or local kernel that cannot be resolved, downloaded, verified or imported."""


class KernelRefError(KernelhubError):
    """A kernel reference ('org/name@rev:Symbol' or a local directory) that is malformed."""


class UntrustedKernelError(KernelhubError):
    """A Hub kernel repo (or a dependency of one) that is not on the trust allowlist."""


class TrustConfigError(UntrustedKernelError):
    """A kernelhub config file (the `trusted = [...]` allowlist) that cannot be read: a refusal, as
    nothing it lists can be trusted."""


class LockError(KernelhubError):
    """A lock file that cannot be read, misses a kernel, or does not match the files on disk."""


class UnsafeKernelError(KernelhubError):
    """A kernel variant holding something whose bytes a digest could not vouch for."""


# Refusals that protect the user: raised at once wherever a kernel is loaded, never turned into a
# quiet fallback to the next candidate of a chain (an untrusted repo, a lock mismatch, bytecode or
# symlinks in a variant).
REFUSALS = (UntrustedKernelError, LockError, UnsafeKernelError)


class KernelMetadataError(KernelhubError):
    """A metadata.json or kernelhub.json field of the wrong type or value."""


class SamplingError(KernelhubError):
    """A sampling option of the wrong type or range, or an unknown one."""


class CheckpointError(KernelhubError):
    """A checkpoint directory, config or weight file that cannot be loaded."""


class ConfigError(CheckpointError):
    """A config field (config.json or GGUF metadata) of the wrong type, range or size for its weights."""


class TensorParallelError(KernelhubError):
    """A tensor-parallel load that cannot run as asked: no process group, a plan key matching no module,
    sizes the group does not divide, ranks on different devices. Raised before any weight is read."""


def closest_first(name: str, choices) -> list[str]:
    """Return `choices` sorted with the closest matches to `name` first.

    >>> closest_first("spda", ["eager", "flex", "sdpa"])[0]
    'sdpa'
    """
    choices = sorted(set(choices))
    near = difflib.get_close_matches(name, choices, n=len(choices), cutoff=0.0) if name else []
    return near + [c for c in choices if c not in near]


def suggestion(name: str, choices) -> str:
    """A ' Did you mean X?' sentence, or '' when nothing is close."""
    near = difflib.get_close_matches(name, sorted(set(choices)), n=1, cutoff=0.6)
    return f" Did you mean {near[0]!r}?" if near else ""
