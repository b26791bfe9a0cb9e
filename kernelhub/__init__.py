"""kernelhub: model files declare what they compute; a plugin registry decides how it runs.

>>> import kernelhub
>>> sorted(b.name for b in kernelhub.backends())[:3]
['eager', 'flex', 'sdpa']
"""

from kernelhub.declare.attention_mask import AttentionMask
from kernelhub.declare.cache import DynamicCache, StaticCache
from kernelhub.declare.errors import (BindError, CheckpointError, ConfigError, HubKernelError, KernelhubError,
                                      KernelMetadataError, LockError, RegistrationError, SamplingError,
                                      TensorParallelError, UnknownBackendError, UnsafeKernelError,
                                      UntrustedKernelError)
from kernelhub.declare.layer import layer
from kernelhub.declare.reference_layers import Linear
from kernelhub.declare.masks import (and_masks, bidirectional_mask, causal_mask, chunked_mask, or_masks,
                                     padding_mask, sliding_window_mask)
from kernelhub.declare.site import AttentionSite, SiteBinding
from kernelhub.runtime.sampling import SamplingParams
from kernelhub.registry.plugins import backends, register_backend, unregister_backend
from kernelhub.registry.swap import use_kernels
from kernelhub.registry.bind import bind, unbind
from kernelhub.registry.capabilities import AttentionBackend, Capabilities, unsupported
from kernelhub.registry.hookspecs import hookimpl
from kernelhub.registry.layer_contract import LayerCapabilities
from kernelhub.registry.modes import Mode
from kernelhub.registry.plan import BindingPlan, PlanEntry
from kernelhub.registry.plugins import get_registry, scoped_registry
from kernelhub.runtime.pretrained import explain, from_pretrained, load_tokenizer

from kernelhub import debug  # kernelhub.debug.trace(model, inputs); imported after the API it uses
from kernelhub import moved_modules

moved_modules.install()  # 0.2 module paths keep working for one release

__version__ = "0.1.0"

__all__ = [
    "AttentionBackend", "AttentionMask", "AttentionSite", "BindError", "BindingPlan", "Capabilities",
    "CheckpointError", "ConfigError", "DynamicCache", "HubKernelError", "KernelMetadataError", "KernelhubError",
    "LayerCapabilities", "Linear", "LockError", "Mode", "PlanEntry", "RegistrationError", "SamplingError",
    "SamplingParams", "SiteBinding",
    "StaticCache", "TensorParallelError", "UnknownBackendError", "UnsafeKernelError", "UntrustedKernelError",
    "and_masks", "backends",
    "bidirectional_mask", "bind", "causal_mask", "chunked_mask", "debug", "explain", "from_pretrained",
    "load_tokenizer",
    "get_registry", "hookimpl", "layer", "or_masks", "padding_mask", "register_backend", "scoped_registry",
    "sliding_window_mask", "unbind", "unregister_backend", "unsupported", "use_kernels",
]
