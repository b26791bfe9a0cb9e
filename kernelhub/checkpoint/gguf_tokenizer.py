"""A `tokenizers` tokenizer built from a GGUF file's vocabulary, merges and special tokens.

Supports the byte-level BPE vocabularies llama.cpp calls `gpt2` (SmolLM2, Llama 3, Qwen2),
built the way transformers builds them from the same file: BPE over the byte-to-unicode
alphabet, a ByteLevel pre-tokenizer and decoder, control tokens added as special tokens.
The files it writes load with `kernelhub.checkpoint.tokenizer.Tokenizer.from_file`, so a GGUF
tokenizer has the same transformers-style API (`tok(texts, padding=True, return_tensors="pt")`,
`decode`, `apply_chat_template`, special-token ids) as a checkpoint's.
"""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from kernelhub.declare.errors import CheckpointError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def byte_level_bpe(meta: dict) -> Tokenizer:
    tokens = meta["tokenizer.ggml.tokens"]
    alphabet = set(bytes_to_unicode().values())
    spell = bytes_to_unicode()
    vocab = {tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8")): i
             for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    if not merges:
        raise CheckpointError("GGUF byte-level vocabulary has no merges; cannot build its tokenizer")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    special = [AddedToken(t, normalized=False, special=True) for t, kind in zip(tokens, types)
               if kind == CONTROL and set(t) <= alphabet]
    tok.add_special_tokens(special)
    added = [AddedToken(t, normalized=False, special=False) for t, kind in zip(tokens, types)
             if kind == USER_DEFINED and t in vocab]
    tok.add_tokens(added)
    return tok


def tokenizer_files(meta: dict) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config dict) for the vocabulary a GGUF file describes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError("GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer type {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
    tokens = meta["tokenizer.ggml.tokens"]
    tok = byte_level_bpe(meta)

    def token(key):
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and idx < len(tokens) else None

    # As transformers reads the same file: special tokens by their ids, no padding token unless
    # the file names one, right padding; the result loads through `Tokenizer.from_file` like any
    # checkpoint, so the GGUF tokenizer has exactly the API of the others.
    config = {
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
        "chat_template": meta.get("tokenizer.chat_template"), "padding_side": "right",
    }
    return tok.to_str(), config
