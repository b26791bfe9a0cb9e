"""The tokenizer's calling conventions equal transformers' on MiniLM (BERT) and the SmolLM2 GGUF."""

import pytest
import torch
import transformers

import kernelhub
from kernelhub.testing.samples import minilm_dir, smollm2_gguf

TEXTS = ["Hello, world! don't", ["A man is eating food.", "Hi", "The stock market fell sharply on Monday."]]
CALLS = [{}, {"padding": True}, {"padding": "longest", "padding_side": "left"},
         {"padding": "max_length", "max_length": 12}, {"truncation": True, "max_length": 5}, {"max_length": 4},
         {"padding": True, "return_tensors": "pt"}, {"padding": True, "truncation": True, "max_length": 6,
                                                     "return_tensors": "pt"},
         {"add_special_tokens": False}, {"padding": True, "pad_to_multiple_of": 8}]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def assert_same(ours, theirs):
    assert type(ours).__name__ == "BatchEncoding" and list(ours) == list(theirs)
    for key in theirs:
        if isinstance(theirs[key], torch.Tensor):
            assert torch.equal(ours[key], theirs[key]), key
        else:
            assert ours[key] == theirs[key], key


@pytest.fixture(scope="module")
def minilm():
    return kernelhub.load_tokenizer(minilm_dir()), transformers.AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    return kernelhub.load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.mark.parametrize("text", TEXTS, ids=["one", "batch"])
@pytest.mark.parametrize("kwargs", CALLS, ids=[str(c) for c in CALLS])
def test_minilm_calls_equal_transformers(minilm, text, kwargs):
    ours, theirs = minilm
    assert_same(ours(text, **kwargs), theirs(text, **kwargs))


def test_minilm_single_string_gives_flat_lists(minilm):
    enc = minilm[0]("Hi")
    assert enc["input_ids"] == [101, 7632, 102] and enc.attention_mask == [1, 1, 1] and enc.token_type_ids == [0] * 3


def test_minilm_special_tokens_and_sides(minilm):
    ours, theirs = minilm
    for name in ("pad", "cls", "sep", "unk", "mask", "bos", "eos"):
        assert getattr(ours, f"{name}_token") == getattr(theirs, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
    assert (ours.padding_side, ours.truncation_side, ours.model_max_length) == ("right", "right", 512)
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids


def test_minilm_decode_and_batch_decode(minilm):
    ours, theirs = minilm
    batch = theirs(TEXTS[1], padding=True)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(batch, skip_special_tokens=skip) == theirs.batch_decode(batch,
                                                                                       skip_special_tokens=skip)
        assert ours.decode(torch.tensor(batch[1]), skip_special_tokens=skip) == theirs.decode(
            batch[1], skip_special_tokens=skip)
    assert ours.decode(batch[0]).startswith("[CLS]")  # transformers' default keeps special tokens


def test_bad_options_are_clear_errors(minilm):
    tok = minilm[0]
    with pytest.raises(ValueError, match="padding='longer' is not supported; valid: "):
        tok("hi", padding="longer")
    with pytest.raises(ValueError, match="return_tensors='np' is not supported; valid: None"):
        tok("hi", return_tensors="np")
    with pytest.raises(ValueError, match="rows of different lengths; pass padding=True"):
        tok(["hi", "hi there friend"], return_tensors="pt")
    with pytest.raises(TypeError, match="text must be a string or a list of strings, got int"):
        tok(5)
    with pytest.raises(ValueError, match="has no chat template"):
        tok.apply_chat_template(CHAT)


def test_encoding_feeds_the_model(minilm):
    model = kernelhub.from_pretrained(minilm_dir(), attn_implementation="sdpa")
    batch = minilm[0](TEXTS[1], padding=True, return_tensors="pt").to("cpu")
    assert model(**batch).last_hidden_state.shape[:2] == batch["input_ids"].shape


@pytest.mark.parametrize("kwargs", [{}, {"padding": True}, {"padding": True, "padding_side": "left",
                                                            "return_tensors": "pt"},
                                    {"truncation": True, "max_length": 3}], ids=["plain", "pad", "left-pt", "trunc"])
def test_smollm2_calls_equal_transformers(smollm2, kwargs):
    ours, theirs = smollm2
    for text in (["hi there", "a", "héllo wörld 🤗"], "<|im_start|>user\nhi<|im_end|>"):
        assert_same(ours(text, **kwargs), theirs(text, **kwargs))


def test_smollm2_special_tokens(smollm2):
    ours, theirs = smollm2
    for name in ("pad", "bos", "eos", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(theirs, f"{name}_token"), name
        assert getattr(ours, f"{name}_token_id") == getattr(theirs, f"{name}_token_id"), name
    assert ours.padding_side == theirs.padding_side == "right"
    assert ours.all_special_tokens == theirs.all_special_tokens


@pytest.mark.parametrize("kwargs", [{}, {"add_generation_prompt": True}, {"tokenize": False},
                                    {"return_dict": False}, {"add_generation_prompt": True, "return_tensors": "pt"},
                                    {"return_dict": False, "return_tensors": "pt"}],
                         ids=["default", "gen-prompt", "text", "ids", "pt", "ids-pt"])
def test_smollm2_chat_template_equals_transformers(smollm2, kwargs):
    ours, theirs = smollm2
    a, b = ours.apply_chat_template(CHAT, **kwargs), theirs.apply_chat_template(CHAT, **kwargs)
    if isinstance(b, transformers.BatchEncoding):
        assert_same(a, b)
    elif isinstance(b, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_smollm2_batched_chat_and_decode(smollm2):
    ours, theirs = smollm2
    chats = [CHAT, [{"role": "user", "content": "Hi"}]]
    kwargs = {"add_generation_prompt": True, "padding": True, "return_tensors": "pt"}
    assert_same(ours.apply_chat_template(chats, **kwargs), theirs.apply_chat_template(chats, **kwargs))
    ids = theirs("hi <|im_end|> x")["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_chat_template_tojson_renders_like_transformers(minilm):
    ours, theirs = minilm
    template = "{{ tools | tojson }}|{{ messages | tojson(indent=2) }}"
    tools = [{"name": "f", "description": "a < b & 'c' é"}]
    messages = [{"role": "user", "content": "x > y"}]
    kwargs = dict(chat_template=template, tools=tools, tokenize=False)
    assert ours.apply_chat_template(messages, **kwargs) == theirs.apply_chat_template(messages, **kwargs)
