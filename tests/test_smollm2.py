"""The real SmolLM2-135M-Instruct GGUF: tokenizer, logits and greedy tokens equal transformers' (dequantised:
transformers computes with float weights; the packed default differs by float rounding, see test_gguf_packed)."""

import pytest
import torch

import kernelhub
from kernelhub.testing.samples import smollm2_gguf

STRINGS = [
    "Hello world", " Hello  world", "1234567 + 89 = 1234656", "héllo wörld ñ 日本語 🤗",
    "def f(x):\n    return x**2\n", "\t\ttabs\n\nnewlines", "<|im_start|>user\nhi<|im_end|>", "  leading",
    "trailing   ", "a  b   c    d", "3.14159", "don't can't I'm", "URL: https://x.y/z?a=1&b=2", "$100,000.00",
    "emoji 😀😃😄", "中文测试", "x" * 50, "CamelCaseWord snake_case_word", "  \n  ", "<|endoftext|> and more",
    "Ünïcödé ÅÉÎÕÜ", "for i in range(10): print(i)",
]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Convert into a per-run cache so the test exercises conversion, not a leftover."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KERNELHUB_CACHE", str(tmp_path_factory.mktemp("kernelhub-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tokenizer():
    return kernelhub.load_tokenizer(smollm2_gguf())


@pytest.fixture(scope="module")
def model():
    return kernelhub.from_pretrained(smollm2_gguf(), attn_implementation="sdpa", dequantize=True)


@pytest.fixture(scope="module")
def reference():
    import transformers

    path = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tok


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")["input_ids"]


def test_tokenization_matches_transformers(tokenizer, reference):
    _, ref_tok = reference
    for text in STRINGS:
        assert tokenizer.encode(text) == ref_tok(text)["input_ids"], text
        assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_chat_template_matches_transformers(tokenizer, reference):
    _, ref_tok = reference
    assert tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True) == \
        ref_tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)


def test_logits_match_transformers(model, reference, prompt_ids):
    ref_model, _ = reference
    with torch.no_grad():
        assert (model(prompt_ids).logits - ref_model(prompt_ids).logits).abs().max() <= 1e-4


def test_greedy_tokens_match_transformers(model, reference, prompt_ids):
    ref_model, _ = reference
    ours = model.generate(prompt_ids, max_new_tokens=32, eos_token_id=None)  # not the config eos: 32 tokens
    theirs = ref_model.generate(prompt_ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                                min_new_tokens=32)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_answers_paris(backend, tokenizer, prompt_ids):
    model = kernelhub.from_pretrained(smollm2_gguf(), attn_implementation=backend)
    out = model.generate(prompt_ids, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, prompt_ids.shape[1]:])


def test_second_load_reuses_the_converted_checkpoint(monkeypatch):
    import kernelhub.checkpoint.gguf as gguf_module

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_module, "read_tensors", no_conversion)
    kernelhub.from_pretrained(smollm2_gguf())
