"""kernelhub: model files declare what they compute; a plugin registry decides how it runs.

>>> import kernelhub
>>> sorted(b.name for b in kernelhub.backends())[:3]
['eager', 'flex', 'sdpa']
"""

from kernelhub.backends.attention_mask import AttentionMask
from kernelhub.backends.cache import DynamicCache, StaticCache
from kernelhub.backends.layer import Linear, layer
from kernelhub.backends.masks import (and_masks, bidirectional_mask, causal_mask, chunked_mask, or_masks,
                                      padding_mask, sliding_window_mask)
from kernelhub.backends.site import AttentionSite
from kernelhub.registry.api import backends, register_backend, unregister_backend, use_kernels
from kernelhub.registry.bind import bind, unbind
from kernelhub.registry.capabilities import AttentionBackend, Capabilities, unsupported
from kernelhub.registry.errors import (BindError, CheckpointError, KernelhubError, RegistrationError,
                                       UnknownBackendError)
from kernelhub.registry.hookspecs import hookimpl
from kernelhub.registry.manager import get_registry, scoped_registry
from kernelhub.registry.plan import BindingPlan, PlanEntry
from kernelhub.registry.pretrained import explain, from_pretrained, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "AttentionBackend", "AttentionMask", "AttentionSite", "BindError", "BindingPlan", "Capabilities",
    "CheckpointError", "DynamicCache", "KernelhubError", "Linear", "PlanEntry", "RegistrationError", "StaticCache",
    "UnknownBackendError", "and_masks", "backends", "bidirectional_mask", "bind", "causal_mask", "chunked_mask",
    "explain", "from_pretrained", "load_tokenizer", "get_registry", "hookimpl", "layer", "or_masks", "padding_mask",
    "register_backend", "scoped_registry", "sliding_window_mask", "unbind", "unregister_backend", "unsupported",
    "use_kernels",
]
