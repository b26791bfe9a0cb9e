"""`kernelhub demo`: a small random Llama checkpoint, loaded with each backend, generating tokens.

Shows the whole path a user takes: a checkpoint in the Hugging Face layout on disk,
`from_pretrained` with an `attn_implementation`, the binding plan, and generation, with
every backend producing the same tokens as the eager reference.
"""

from __future__ import annotations

import tempfile
import time

import torch

TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}


def write_random_checkpoint(path, config=TINY_LLAMA, seed=0) -> None:
    """Save a randomly initialised model of `config` in the Hugging Face layout."""
    from kernelhub.models.llama import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)  # a livelier distribution than the default init
    model.save_pretrained(path)


def run_demo(max_new_tokens: int = 16) -> int:
    import kernelhub

    prompt = torch.tensor([[1, 17, 42, 99, 7, 3]])
    with tempfile.TemporaryDirectory() as path:
        write_random_checkpoint(path)
        print(f"wrote a random {TINY_LLAMA['num_hidden_layers']}-layer Llama checkpoint (GQA 4/2)\n")
        print("plan for training with {'model.layers.0.*': 'eager', '*': ['flex', 'sdpa']} (no weights read):")
        print(kernelhub.explain(path, attn_implementation={"model.layers.0.*": "eager", "*": ["flex", "sdpa"]},
                                mode="training"))
        print()
        reference = None
        for attn in ("eager", "sdpa", "flex"):
            model = kernelhub.from_pretrained(path, attn_implementation=attn, dtype="float32")
            if attn == "flex":
                print("(flex compiles its kernel on first use; this takes a few seconds on CPU)")
            start = time.perf_counter()
            tokens = model.generate(prompt, max_new_tokens=max_new_tokens)
            seconds = time.perf_counter() - start
            new = tokens[0, prompt.shape[1]:].tolist()
            reference = new if reference is None else reference
            agree = "same as eager" if new == reference else "DIFFERS from eager"
            print(f"{attn:5s} bound to {sorted(model.binding.chosen())}: {new}  "
                  f"({max_new_tokens / seconds:.0f} tok/s, {agree})")
            if new != reference:
                return 1
        print("\nbinding plan of the last model:")
        print(model.binding)
    return 0
