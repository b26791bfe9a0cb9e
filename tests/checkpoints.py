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


def write_hf_checkpoint(model_type: str, path, seed: int = 0):
    """Save a transformers model with random weights; return the transformers model (fp32, eager)."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[model_type]
    model_cls = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[model_type]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**CONFIGS[model_type]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)  # transformers initialises biases to zero; make qwen2's bias matter
    model.save_pretrained(path)
    return model.eval()
