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


class CheckpointError(KernelhubError):
    """A checkpoint directory, config or weight file that cannot be loaded."""


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
