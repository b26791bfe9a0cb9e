"""Reading and writing checkpoints: the Hugging Face layout (safetensors, config), GGUF files,
tokenizers, chat templates and generation configs."""
