"""`kernelhub demo`: the library on two real models.

(a) all-MiniLM-L6-v2 embeds sentences under each attention backend: similarities, the
    binding plan, and agreement with the eager reference.
(b) SmolLM2-135M-Instruct answers chat prompts under the chosen backend, with tokens/s, then
    answers eight prompts at once with continuous batching (`generate_batch`).
(c) Gemma 3 270M (the base model), from its real Q4_K_M GGUF file, continues three prompts
    (sliding and global layers, q/k norms, Gemma's `(1 + weight)` norms: one model file,
    `kernelhub/models/gemma3.py`).

Both GGUF models keep their quantised weights packed (the default: the `gguf` kernels multiply by
the ggml blocks and read embedding rows from them); the demo prints the weights' size in memory.
The GGUF conversion of the other tensors is cached in the user cache directory, so the second run
starts fast.
"""

from __future__ import annotations

import time

import torch

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "The stock market fell sharply on Monday."]
QUESTIONS = ["What is the capital of France?", "Name three primary colors.",
             "Write a haiku about the sea."]
MORE_QUESTIONS = ["Explain gravity to a child.", "What is 12 times 7?", "List four animals that live in the ocean.",
                  "Who wrote Romeo and Juliet?", "Give me a tip for learning to code."]


def embed(model, batch):
    from kernelhub.models.bert import mean_pool

    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def embeddings_demo() -> bool:
    import kernelhub
    from kernelhub.testing.samples import minilm_dir

    path = minilm_dir()
    batch = kernelhub.load_tokenizer(path)(SENTENCES, padding=True, return_tensors="pt")
    print(f"== all-MiniLM-L6-v2 sentence embeddings ({len(SENTENCES)} sentences, padded batch) ==\n")
    results, model = {}, None
    for backend in ("eager", "sdpa", "flex"):
        model = kernelhub.from_pretrained(path, attn_implementation=backend)
        start = time.perf_counter()
        results[backend] = embed(model, batch)
        note = " (includes compiling flex once)" if backend == "flex" else ""
        print(f"  {backend:5s} {1e3 * (time.perf_counter() - start):7.1f} ms{note}")
    worst = max((results[b] - results["eager"]).abs().max().item() for b in results)
    print(f"\n  max |difference| to eager over all backends: {worst:.1e}\n")
    sims = results["sdpa"] @ results["sdpa"].T
    print("  cosine similarity (sdpa):")
    for i, s in enumerate(SENTENCES):
        print(f"    {s[:34]:34s} " + " ".join(f"{v:6.3f}" for v in sims[i].tolist()))
    print("\n  binding plan of the flex model:")
    print("    " + str(model.binding).replace("\n", "\n    "))
    return worst <= 1e-4


def chat_demo(attn: str, max_new_tokens: int) -> None:
    import kernelhub
    from kernelhub.testing.samples import smollm2_gguf

    path = smollm2_gguf()
    print(f"\n== SmolLM2-135M-Instruct chat (attn_implementation={attn!r}) ==\n")
    start = time.perf_counter()
    # The GGUF file's Q4_1/Q8_0 blocks stay packed: the gguf kernels serve them on the CPU.
    model = kernelhub.from_pretrained(path, attn_implementation=attn)
    tokenizer = kernelhub.load_tokenizer(path, model=model)
    print(f"  loaded in {time.perf_counter() - start:.1f} s (GGUF conversion is cached after the first run); "
          f"attention {sorted(model.binding.chosen())}, layer kernels {kernels_of(model)}; "
          f"weights {weight_mb(model):.0f} MB\n")
    answers = []
    for question in QUESTIONS:
        ids = torch.tensor([chat_ids(tokenizer, question)])
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
        new = out.shape[1] - ids.shape[1]
        answers.append(out[0, ids.shape[1]:].tolist())
        answer = tokenizer.decode(answers[-1], skip_special_tokens=True).strip().replace("\n", "\n      ")
        print(f"  Q: {question}\n  A: {answer}\n     ({new} tokens, {new / seconds:.1f} tokens/s)\n")
    batch_demo(model, tokenizer, max_new_tokens, answers)


def kernels_of(model) -> list[str]:
    """The layer kernels the model's plan chose, other than the declared references."""
    return sorted(model.binding.chosen("layer") - {"reference"})


def weight_mb(model) -> float:
    """Parameters and buffers in memory, in MB (packed GGUF blocks count as stored)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 1e6


def chat_ids(tokenizer, question: str) -> list[int]:
    """The token ids of a one-turn chat, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_dict=False)


def batch_demo(model, tokenizer, max_new_tokens: int, answers: list) -> None:
    questions = QUESTIONS + MORE_QUESTIONS
    prompts = [chat_ids(tokenizer, q) for q in questions]
    print(f"== the same model, {len(prompts)} prompts at once: model.generate_batch (continuous batching) ==\n")
    start = time.perf_counter()
    results = model.generate_batch(prompts, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    for question, result in zip(questions[len(QUESTIONS):], results[len(QUESTIONS):]):
        print(f"  Q: {question}\n  A: {tokenizer.decode(result.tokens, skip_special_tokens=True).strip()[:70]!r}")
    new = sum(len(r.tokens) for r in results)
    same = all(r.tokens == a for r, a in zip(results, answers))
    print(f"\n  {new} tokens in {seconds:.1f} s ({new / seconds:.1f} tokens/s); the first {len(answers)} answers "
          f"{'equal' if same else 'DIFFER FROM'} the one-by-one answers above\n")


# The Gemma 3 270M file is the pretrained (base) model, with no chat template: it continues text.
GEMMA_PROMPTS = ["The capital of France is", "The three primary colors are", "A haiku about the sea:\n"]


def gemma_demo(attn: str, max_new_tokens: int) -> None:
    import kernelhub
    from kernelhub.testing.samples import gemma3_gguf

    path = gemma3_gguf()
    print(f"== Gemma 3 270M, a base model from its Q4_K_M GGUF file, continues text (attn_implementation={attn!r}) "
          "==\n")
    start = time.perf_counter()
    model = kernelhub.from_pretrained(path, attn_implementation=attn)
    tokenizer = kernelhub.load_tokenizer(path, model=model)
    print(f"  loaded in {time.perf_counter() - start:.1f} s (the conversion is cached after the first run); "
          f"layer kernels {kernels_of(model)}; weights {weight_mb(model):.0f} MB\n")
    for prompt in GEMMA_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id)
        new = out.shape[1] - ids.shape[1]
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).rstrip().replace("\n", "\n      ")
        print(f"  {prompt.strip()!r} ->{text}\n     ({new} tokens, {new / (time.perf_counter() - start):.1f} "
              "tokens/s)\n")


def run_demo(attn: str = "sdpa", max_new_tokens: int = 48) -> int:
    agree = embeddings_demo()
    chat_demo(attn, max_new_tokens)
    gemma_demo(attn, max_new_tokens)
    if not agree:
        print("backends disagree with the eager reference beyond 1e-4")
        return 1
    return 0
