"""Random-weight checkpoints in the Hugging Face layout, written by transformers itself."""

import torch

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

CONFIGS = {
    "llama": dict(COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32},
                  tie_word_embeddings=True),
    "mistral": dict(COMMON, sliding_window=4),
    "qwen2": dict(COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1, num_key_value_heads=1),
}


def write_hf_checkpoint(model_type: str, path, seed: int = 0, **overrides):
    """Save a transformers model with random weights (`overrides` change the config); return the
    transformers model (fp32, eager)."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[model_type]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**CONFIGS[model_type], **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)  # transformers initialises biases to zero; make qwen2's bias matter
    model.save_pretrained(path)
    return model.eval()


# Qwen3 and Qwen3-MoE: q/k norms, an explicit head_dim (not hidden / heads), q/k/v/o biases,
# sliding windows, and (MoE) sparse blocks on layers 1 and 3 (decoder_sparse_step=2), dense on 0 and 2.
QWEN3_CONFIGS = {
    "qwen3": dict(COMMON, head_dim=32, attention_bias=True, use_sliding_window=True, sliding_window=4,
                  max_window_layers=1),
    "qwen3_moe": dict(COMMON, num_hidden_layers=4, head_dim=32, attention_bias=True, use_sliding_window=True,
                      sliding_window=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=True),
}


def write_qwen3_checkpoint(model_type: str, path, seed: int = 0, **overrides):
    """Save a transformers Qwen3 or Qwen3-MoE model with random weights (`overrides` change the config);
    return the transformers model (fp32, eager attention). Biases and norm weights are random too."""
    import transformers

    config_cls, model_cls = {"qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
                             "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM)}[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**QWEN3_CONFIGS[model_type], **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)  # transformers initialises norms to ones; make every norm matter
    model.save_pretrained(path)
    model.set_attn_implementation("eager")
    if model_type == "qwen3_moe":
        model.set_experts_implementation("eager")  # transformers' reference loop over experts
    return model.eval()


# Gemma2: sliding (window 4) / full / sliding layers, softcaps small enough to matter at this init,
# query_pre_attn_scalar != head_dim. gpt-oss: sinks, sliding/full layers, biased experts, YaRN RoPE.
FAMILY_CONFIGS = {
    "gemma2": dict(COMMON, head_dim=16, sliding_window=4, query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                   final_logit_softcapping=2.0, initializer_range=0.1),
    "gpt_oss": dict(COMMON, intermediate_size=32, head_dim=16, sliding_window=4, num_local_experts=4,
                    num_experts_per_tok=2, swiglu_limit=1.0, initializer_range=0.1,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32}),
    # Gemma3: sliding (window 4) / full layers alternating, per-head q/k norms, a local rope base and a scaled
    # global rope small enough to matter at a few dozen positions, query_pre_attn_scalar != head_dim.
    "gemma3_text": dict(COMMON, num_hidden_layers=4, head_dim=16, sliding_window=4, sliding_window_pattern=2,
                        query_pre_attn_scalar=24, initializer_range=0.1,
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 20.0}}),
}


def write_family_checkpoint(model_type: str, path, seed: int = 0, **overrides):
    """Save a transformers Gemma2, Gemma3 or gpt-oss model with random weights; return it (fp32, eager attention).
    Norm weights, biases and sinks are random (transformers initialises them to constants)."""
    import transformers

    config_cls, model_cls = {"gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
                             "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
                             "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM)}[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**FAMILY_CONFIGS[model_type], **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "sinks" in name:
                p.normal_(0, 0.5)
            elif "norm" in name:  # gemma's norm scales by (1 + weight), gpt-oss's by weight
                p.normal_(0, 0.3) if model_type.startswith("gemma") else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    model.set_attn_implementation("eager")
    if model_type == "gpt_oss":
        model.set_experts_implementation("eager")  # transformers' reference loop over experts
    return model.eval()
