"""What every kernelhub model offers besides its forward, named as in transformers.

>>> from kernelhub.models.llama import LlamaForCausalLM
>>> model = LlamaForCausalLM({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
...                           "num_hidden_layers": 1, "num_attention_heads": 2})
>>> model.device, model.dtype, model.generation_config.eos_token_id
(device(type='cpu'), torch.float32, None)
"""

from __future__ import annotations

import torch

from kernelhub.models.generation_config import GenerationConfig


class ModelAPI:
    """Mixin for `nn.Module` models: `.device`, `.dtype`, `.generation_config` (set by `init_api`)."""

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
