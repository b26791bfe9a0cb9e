"""What every kernelhub model offers besides its forward, named as in transformers.

`ModelAPI` serves every model; `CausalLMAPI` adds what every decoder offers (caches, generation).
The steps of a decoder's forward that do not depend on the architecture are in `models.decoder`.

>>> from kernelhub.models.llama import LlamaForCausalLM
>>> model = LlamaForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
...                           "num_hidden_layers": 1, "num_attention_heads": 2})
>>> model.device, model.dtype, model.generation_config.eos_token_id
(device(type='cpu'), torch.float32, None)
"""

from __future__ import annotations

import contextlib

import torch

from kernelhub.declare.cache import DynamicCache, StaticCache
from kernelhub.declare.binding import holding, pinned
from kernelhub.declare.serving import provided
from kernelhub.checkpoint.hf_layout import save_pretrained
from kernelhub.checkpoint.generation_config import GenerationConfig


def _pinned_if(model, compiled):
    """Compiled calls read the binding inside graphs, not from the held record: pin it for the call."""
    return pinned(model) if compiled is True else contextlib.nullcontext()


class ModelAPI:
    """Mixin for `nn.Module` models: `.device`, `.dtype`, `.generation_config` (set by `init_api`),
    `save_pretrained`."""

    def init_api(self, config) -> None:
        """Default `generation_config` from the model config's token ids; `from_pretrained` replaces
        it with the checkpoint's generation_config.json when there is one."""
        raw = getattr(config, "raw", None)
        self.generation_config = GenerationConfig.from_model_config(raw if isinstance(raw, dict) else {})

    @property
    def device(self) -> torch.device:
        """The device of the first parameter (where inputs should go)."""
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating-point parameter."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.get_default_dtype())

    def save_pretrained(self, path):
        """Write config.json (with the binding request) and model.safetensors, in the checkpoint's layout."""
        save_pretrained(self, path)


class CausalLMAPI(ModelAPI):
    """Mixin for decoders laid out as transformers' `*ForCausalLM`: `model.embed_tokens`, `model.layers[i]
    .self_attn.attn` (an `AttentionSite`), `model.rotary_emb`, `lm_head`, and a config with `layer_types`,
    `sliding_window` and `head_dim`."""

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def make_cache(self, kind="dynamic", *, batch=1, max_len=None):
        """A KV cache for this model: "dynamic", or "static" with `max_len` positions.

        >>> from kernelhub.models.llama import LlamaForCausalLM
        >>> model = LlamaForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
        ...                           "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> model.make_cache("static", batch=2, max_len=16).get_seq_length()
        0
        """
        cfg = self.config
        if kind == "dynamic":
            return DynamicCache(cfg.layer_types, cfg.sliding_window)
        if kind == "static":
            # the model's float dtype and device (a GGUF output projection may hold packed blocks instead)
            p = getattr(self.lm_head, "weight", None)
            p = self.model.norm.weight if p is None else p
            kv_heads = self.model.layers[0].self_attn.attn.num_kv_heads  # this rank's, under tensor parallelism
            return StaticCache(cfg.layer_types, batch=batch, max_len=max_len, num_kv_heads=kv_heads,
                               head_dim=cfg.head_dim, dtype=p.dtype, device=p.device)
        raise ValueError(f"unknown cache kind {kind!r}; valid: 'dynamic', 'static'")

    def generate(self, input_ids, **kwargs):
        """Greedy or sampled generation; see `kernelhub.runtime.generate.generate`. The whole call runs
        the binding the model has when it starts, even if another thread rebinds meanwhile."""
        with _pinned_if(self, kwargs.get("compile")), holding(self):  # pin first: a rebind in progress ends
            return provided("generate")(self, input_ids, **kwargs)

    def generate_batch(self, prompts, **kwargs):
        """Continuous batching over a paged KV cache; see `kernelhub.runtime.batching.generate_batch`."""
        with _pinned_if(self, kwargs.get("compile")), holding(self):  # as in generate
            return provided("generate_batch")(self, prompts, **kwargs)

    def fused_sizes(self) -> dict:
        """Rows of each part of the fused projections the model file declares in `FUSED`, in `FUSED` order:
        q/k/v by heads, gate/up in halves (`models.checkpoint` splits them on save).

        >>> from kernelhub.models.llama import LlamaForCausalLM
        >>> LlamaForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 6, "num_hidden_layers": 1,
        ...                   "num_attention_heads": 2, "num_key_value_heads": 1}).fused_sizes()
        {'self_attn.qkv_proj': [8, 4, 4], 'mlp.gate_up_proj': [6, 6]}
        """
        cfg = self.config
        kv = cfg.num_key_value_heads * cfg.head_dim
        sizes = {"self_attn.qkv_proj": [cfg.num_attention_heads * cfg.head_dim, kv, kv],
                 "mlp.gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size]}
        return {name: sizes[name] for name in self.FUSED}

    def reset_buffers(self):
        """Recompute non-persistent buffers after construction on the meta device."""
        self.model.rotary_emb.reset_buffers()

