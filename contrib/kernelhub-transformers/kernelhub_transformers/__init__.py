"""Run transformers models with kernelhub's attention backends.

    import kernelhub_transformers            # registers every kernelhub backend as "kernelhub:<name>"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="kernelhub:flex")

Backends registered with kernelhub later (plugins loaded afterwards, or at runtime) are
added with `kernelhub_transformers.register()`. The import must come first: until it has run,
transformers knows no `kernelhub:` name and refuses one with its own "is not supported" error.

Each backend is registered in transformers' `AttentionInterface` (the function) and
`AttentionMaskInterface` (a mask builder producing the backend's declared mask format), so
transformers builds exactly the mask the backend expects: bool, additive or BlockMask. When
transformers refuses a `kernelhub:NAME`, its error also says why (a backend whose mask format
transformers cannot build, such as flash's varlen) or lists the kernelhub names it accepts.

Layer kernels need no bridge: `kernelhub.bind(hf_model, kernels={"RMSNorm": ...})` binds
into transformers models that mark layers with `kernel_layer_name` (as `kernels` does);
`attn_implementation=` there is refused with a pointer to this bridge, because transformers
models have no kernelhub attention sites.
"""

from __future__ import annotations

import torch

PREFIX = "kernelhub:"


def _mask_builder(backend):
    """A transformers mask function producing `backend.mask_format`."""
    from transformers import masking_utils as mu

    fmt = backend.mask_format
    skip = backend.accepts_is_causal  # only a backend that opted in may receive mask=None

    def forced(build, **fixed):
        # transformers passes the skip flags itself; a backend's declaration must win.
        def builder(*args, **kwargs):
            return build(*args, **{**kwargs, **fixed})
        return builder

    if fmt == "block_mask":
        return mu.flex_attention_mask
    if fmt == "additive":
        return forced(mu.eager_mask, allow_is_bidirectional_skip=False)
    if fmt == "bool":
        return forced(mu.sdpa_mask, allow_is_causal_skip=skip, allow_is_bidirectional_skip=skip)
    if fmt == "none":
        return lambda *args, **kwargs: None
    raise ValueError(f"kernelhub backend {backend.name!r} has mask format {fmt!r}, which transformers cannot build")


def _attention_function(backend):
    resolved = {}

    def function_for(query):
        """The backend's function for this device/dtype (kernelhub resolves some backends per device)."""
        if backend.resolve is None:
            return backend.fn
        where = (query.device, query.dtype)
        if where not in resolved:
            res = backend.resolution(query.device, query.dtype)
            if res.problems:
                raise ValueError(f"kernelhub backend {backend.name!r} cannot run on {query.device}: "
                                 f"{'; '.join(res.problems)}")
            resolved[where] = res.fn
        return resolved[where]

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        fn = function_for(query)
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        extra = {}
        if backend.accepts_is_causal and attention_mask is None:
            extra["is_causal"] = getattr(module, "is_causal", True) and query.shape[2] > 1
        if kwargs.get("softcap") is not None:
            if not backend.capabilities.on(query.device.type).softcap:  # never drop it silently
                raise ValueError(f"kernelhub backend {backend.name!r} has no logit softcap, which this model "
                                 f"uses (softcap {kwargs['softcap']}); use one that has: eager, flex, flash")
            extra["softcap"] = kwargs["softcap"]
        if backend.mask_format == "bool" and attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.bool()
        return fn(module, query, key, value, attention_mask, scaling=scaling,
                  dropout=dropout if module.training else 0.0, **extra)

    attention.__name__ = f"kernelhub_{backend.name}"
    return attention


BRIDGED_MASK_FORMATS = ("block_mask", "additive", "bool", "none")


def bridge_problem(backend) -> str | None:
    """Why `backend` cannot run inside transformers' attention interface, or None."""
    if backend.mask_format not in BRIDGED_MASK_FORMATS:
        return (f"mask format {backend.mask_format!r} is not one transformers builds "
                f"({', '.join(BRIDGED_MASK_FORMATS)}); use transformers' own flash_attention_2 for varlen kernels")
    return None


def register(names=None) -> list[str]:
    """Register kernelhub backends with transformers; returns the registered keys.

    With `names=None`, every backend that can be bridged (see `bridge_problem`); a backend
    named explicitly that cannot be is an error saying why."""
    import kernelhub
    from transformers import AttentionInterface, AttentionMaskInterface

    keys = []
    for backend in kernelhub.backends():
        if names is not None and backend.name not in names:
            continue
        problem = bridge_problem(backend)
        if problem and names is None:
            continue
        if problem:
            raise ValueError(f"kernelhub backend {backend.name!r} cannot be bridged to transformers: {problem}")
        key = PREFIX + backend.name
        AttentionInterface.register(key, _attention_function(backend))
        AttentionMaskInterface.register(key, _mask_builder(backend))
        keys.append(key)
    return keys


def explain_request(requested: str) -> str:
    """What kernelhub can say about a `kernelhub:NAME` that transformers refused: why that
    backend cannot run inside transformers, or which names can."""
    import difflib

    import kernelhub

    name = requested[len(PREFIX):]
    backends = {b.name: b for b in kernelhub.backends()}
    if name in backends and bridge_problem(backends[name]):
        return f"kernelhub backend {name!r} cannot run inside transformers: {bridge_problem(backends[name])}."
    usable = [PREFIX + n for n, b in backends.items() if not bridge_problem(b)]
    near = difflib.get_close_matches(requested, usable, n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return (f"kernelhub backends usable here: {', '.join(usable)}.{hint} A backend registered after "
            "`import kernelhub_transformers` needs `kernelhub_transformers.register()`.")


def _explained(original):
    """transformers' attn_implementation check, with kernelhub's names and reasons added to its
    error for a `kernelhub:` request (transformers' own message lists only its built-ins)."""

    def get_correct_attn_implementation(self, requested_attention, is_init_check=False):
        try:
            return original(self, requested_attention, is_init_check)
        except ValueError as e:
            if not (isinstance(requested_attention, str) and requested_attention.startswith(PREFIX)):
                raise
            raise ValueError(f"{e} {explain_request(requested_attention)}") from None

    get_correct_attn_implementation.__wrapped__ = original
    return get_correct_attn_implementation


def _install_explanations():
    from transformers import PreTrainedModel

    current = PreTrainedModel.get_correct_attn_implementation
    if not hasattr(current, "__wrapped__"):
        PreTrainedModel.get_correct_attn_implementation = _explained(current)


register()
_install_explanations()
