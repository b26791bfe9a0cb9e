"""A `tokenizers` tokenizer built from a GGUF file's vocabulary, merges and special tokens.

Supports the byte-level BPE vocabularies llama.cpp calls `gpt2` (SmolLM2, Llama 3, Qwen2),
built the way transformers builds them from the same file: BPE over the byte-to-unicode
alphabet, a ByteLevel pre-tokenizer and decoder, control tokens added as special tokens.
And Gemma 3's SentencePiece vocabulary (llama.cpp's `llama` model in a `gemma3` file), built
as transformers' GGUF loader builds it (`GemmaTokenizer`): BPE with byte fallback over "▁"-spelled
spaces, merges recovered from the vocabulary's order; plus the file's `add_bos_token`.
The files it writes load with `kernelhub.checkpoint.tokenizer.Tokenizer.from_file`, so a GGUF
tokenizer has the same transformers-style API (`tok(texts, padding=True, return_tensors="pt")`,
`decode`, `apply_chat_template`, special-token ids) as a checkpoint's.
"""

from __future__ import annotations

import functools

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

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


def gemma_merges(tokens: list) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies, best first (transformers' `generate_merges`).

    Every split of a token into two tokens is a merge, ranked by the token's position in the file
    (Gemma's scores do not follow its merge order; its token order does), ties broken by the longer
    left piece, then the longer right piece; the splits of one token in vocabulary order.

    >>> gemma_merges(["a", "b", "c", "ab", "abc", "bc"])
    [('a', 'b'), ('ab', 'c'), ('a', 'bc'), ('b', 'c')]
    """
    vocab = {token: i for i, token in enumerate(tokens)}
    scores = {token: -i for i, token in enumerate(tokens)}
    merges = []
    for token, score in scores.items():
        splits = [(token[:i], token[i:], score) for i in range(1, len(token))
                  if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(splits, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def gemma_bpe(meta: dict) -> Tokenizer:
    # Tokens of two or more spaces are stored as spaces; the normalizer spells every space "▁".
    stored = meta["tokenizer.ggml.tokens"]
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in stored]
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=gemma_merges(tokens), dropout=None, fuse_unk=True,
                               byte_fallback=True, unk_token=tokens[unk] if unk is not None else "<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    # Added tokens as transformers adds them: by their stored spelling (so the all-space ones, no longer in
    # the vocabulary under it, are not added; BPE finds them).
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(stored, types) if kind == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(stored, types) if kind == USER_DEFINED and t in vocab])
    # transformers' GGUF loader ignores the file's add_bos_token; llama.cpp (and Gemma's own tokenizer.json)
    # put <bos> first, and Gemma degrades without it.
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 {tokens[bos]}:1 $B:1",
            special_tokens=[(tokens[bos], bos)])
    return tok


def tokenizer_files(meta: dict) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config dict) for the vocabulary a GGUF file describes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError("GGUF file has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    arch = meta.get("general.architecture")
    gemma = kind == "llama" and arch == "gemma3"
    if kind != "gpt2" and not gemma:
        raise CheckpointError(f"GGUF tokenizer type {kind!r} ({arch} file) is not supported; supported: 'gpt2' "
                              "(byte-level BPE), 'llama' in gemma3 files (SentencePiece)")
    tokens = meta["tokenizer.ggml.tokens"]
    tok = gemma_bpe(meta) if gemma else byte_level_bpe(meta)

    def token(key):
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and idx < len(tokens) else None

    # As transformers reads the same file: special tokens by their ids, no padding token unless
    # the file names one, right padding; the result loads through `Tokenizer.from_file` like any
    # checkpoint, so the GGUF tokenizer has exactly the API of the others.
    config = {
        "bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id"), "unk_token": token("unknown_token_id"),
        "chat_template": meta.get("tokenizer.chat_template"),
        "padding_side": "left" if gemma else "right",  # transformers' GemmaTokenizer pads on the left
    }
    return tok.to_str(), config
