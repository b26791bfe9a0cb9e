"""kernelhub's built-in plugin: eager, sdpa, flex and flash attention, the oneDNN Linear kernel, the
packed GGUF QuantizedLinear kernel, the Experts kernels (eager, grouped_mm, batched_mm), and the model
families.

Registered through the same hooks as any third-party plugin.
"""


import torch

from kernelhub.declare.eager import eager_attention
from kernelhub.backends.flash import flash_unresolved, resolve_flash
from kernelhub.backends.flex import flex_attention_backend, resolve_flex
from kernelhub.backends.sdpa import sdpa_attention
from kernelhub.registry.capabilities import AttentionBackend, Capabilities
from kernelhub.registry.hookspecs import hookimpl

EAGER = AttentionBackend(
    name="eager",
    fn=eager_attention,
    mask_format="bool",
    capabilities=Capabilities(softcap=True, sinks=True, dropout=True, returns_weights=True, paged=True),
    description="matmul + softmax reference; returns attention weights",
)

SDPA = AttentionBackend(
    name="sdpa",
    aliases=("scaled_dot_product", "scaled_dot_product_attention"),
    fn=sdpa_attention,
    mask_format="bool",
    accepts_is_causal=True,
    # sinks: one extra zero key whose mask column is the sink logit (backends/sdpa.py), any device
    capabilities=Capabilities(sinks=True, dropout=True, paged=True),
    requires=("torch>=2.5",),
    description="torch.nn.functional.scaled_dot_product_attention",
)

FLEX = AttentionBackend(
    name="flex",
    aliases=("flex_attention",),
    fn=flex_attention_backend,
    mask_format="block_mask",
    resolve=resolve_flex,
    capabilities=Capabilities(
        head_dim=(1, 512), softcap=True, sinks=True, paged=True, backward=False,  # the CPU path is forward-only
        per_device={"cuda": {"head_dim": (16, 256), "backward": True}},  # Triton tiles need 16..256 on CUDA
    ),
    requires=("torch>=2.5",),
    description="torch flex_attention with a BlockMask (compiled once per process)",
)

FLASH = AttentionBackend(
    name="flash",
    aliases=("flash_attn", "flash_attention"),
    fn=flash_unresolved,
    mask_format="varlen",
    resolve=resolve_flash,
    capabilities=Capabilities(
        dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dim=(8, 256), softcap=True, sinks=True, varlen=True,
        paged=True, arbitrary_mask=False, compile=False, backward=False,
    ),
    description="flash-attn on CUDA, else kernelhub's Triton FlashAttention-2 kernel (packed sequences, block tables)",
)


@hookimpl
def kernelhub_attention_backends():
    return [EAGER, SDPA, FLEX, FLASH]


@hookimpl
def kernelhub_layer_kernels():
    from kernelhub.backends.experts import EXPERTS_KERNELS
    from kernelhub.backends.gemv_linear import GemvLinear
    from kernelhub.backends.gguf_embedding import GgufEmbedding
    from kernelhub.backends.gguf_linear import GgufLinear
    from kernelhub.backends.onednn_linear import OneDNNLinear, onednn_available

    linear = {"onednn": OneDNNLinear} if onednn_available() else {}
    return {"Experts": dict(EXPERTS_KERNELS), "Linear": {**linear, "gemv": GemvLinear},
            "QuantizedLinear": {"gguf": GgufLinear}, "QuantizedEmbedding": {"gguf": GgufEmbedding}}


@hookimpl
def kernelhub_model_architectures():
    from kernelhub.models.bert import BertModel
    from kernelhub.models.gemma2 import Gemma2ForCausalLM
    from kernelhub.models.gemma3 import Gemma3ForCausalLM
    from kernelhub.models.gpt_oss import GptOssForCausalLM
    from kernelhub.models.llama import LlamaForCausalLM
    from kernelhub.models.qwen3 import Qwen3ForCausalLM
    from kernelhub.models.qwen3_moe import Qwen3MoeForCausalLM

    return {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM, "qwen2": LlamaForCausalLM, "bert": BertModel,
            "qwen3": Qwen3ForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM, "gemma2": Gemma2ForCausalLM,
            "gpt_oss": GptOssForCausalLM, "gemma3_text": Gemma3ForCausalLM}
