"""Tiny GGUF files written with the `gguf` package, for loader tests."""

import numpy as np

TOKENS = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġa", "c", "abc"]
MERGES = ["a b", "Ġ a", "ab c"]


def write_tiny_gguf(path, *, arch="llama", tokens=TOKENS, tokenizer=True, vocab_rows=None, seed=0, overrides=None,
                    hidden=16, ggml_type=None, types=None):
    """A 1-layer llama-shaped model (hidden 16, 2 heads, 1 kv head) with float32 tensors, tied embeddings.

    `overrides` maps metadata keys to `(value, gguf.GGUFValueType)`, written over the defaults
    (a damaged file: a string block count, a negative epsilon). `ggml_type` quantises every 2-D
    tensor to that type with gguf-py (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: `hidden` a multiple of 32), and
    `types` ({tensor name: type}) some of them.
    """
    import gguf

    rng = np.random.default_rng(seed)
    ff, rows = 2 * hidden, vocab_rows or len(tokens)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges(MERGES)
        w.add_token_types([3] + [1] * (len(tokens) - 1))
        w.add_eos_token_id(0)
    for key, (value, vtype) in (overrides or {}).items():
        w.add_key_value(key, value, vtype)
    shapes = {"token_embd.weight": (rows, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden // 2, hidden),
              "blk.0.attn_v.weight": (hidden // 2, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ff, hidden), "blk.0.ffn_up.weight": (ff, hidden),
              "blk.0.ffn_down.weight": (hidden, ff)}
    for name, shape in shapes.items():
        values = rng.standard_normal(shape).astype(np.float32)
        kind = (types or {}).get(name, ggml_type if len(shape) == 2 else None)
        if kind is None:
            w.add_tensor(name, values)
        else:
            w.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
