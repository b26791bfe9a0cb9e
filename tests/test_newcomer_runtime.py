"""A newcomer's first hour with the runtime: what went silently wrong or read badly, now clear.

Right padding into `generate`, `generation_config=` / `use_cache=` / `num_beams`, option lists in
a readable order, batching with the per-prompt options, MoE router logits and the auxiliary loss
(against transformers), tensor parallelism started by a launcher without `init_process_group`,
devices this torch cannot use, and flex's eager-mode warning and first compile.
"""

import collections
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import kernelhub
from kernelhub.checkpoint.generation_config import GenerationConfig
from kernelhub.checkpoint.tokenizer import Tokenizer

ROOT = Path(__file__).parent.parent
PROMPTS = [[5, 9, 3, 17, 22, 7], [40, 2, 33], [8, 11, 19, 60, 4]]


class WordTokenizer:
    """Token i reads "w<i> ": enough for stop strings."""

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(f"w{int(i)} " for i in ids)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="paged|sdpa")
    model.generation_config.eos_token_id = None  # every run makes all its tokens unless asked
    return model


def free_run(model, prompt, n=10):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt):].tolist()


# -- 1. right padding ------------------------------------------------------------------------------

def test_right_padded_input_is_refused_with_one_clear_error(model):
    ids = torch.tensor([[5, 9, 3, 0, 0], [40, 2, 33, 8, 11]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with pytest.raises(kernelhub.KernelhubError, match=r"^attention_mask row 0 ends in padding \(right padding.*"
                                                        r"padding_side = 'left'"):
        model.generate(ids, attention_mask=mask, max_new_tokens=4)
    left = torch.tensor([[0, 0, 5, 9, 3], [40, 2, 33, 8, 11]])
    out = model.generate(left, attention_mask=mask.flip(-1), max_new_tokens=4)  # left padding: the same tokens
    assert out[0, 5:].tolist() == free_run(model, [5, 9, 3], 4)
    # generate_batch takes unpadded token lists: a mask is not something it could misread
    with pytest.raises(kernelhub.SamplingError, match=r"unknown sampling options \['attention_mask'\]"):
        model.generate_batch(ids.tolist(), attention_mask=mask)


def write_word_tokenizer(path: Path, config: dict) -> None:
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers

    backend = Backend(models.WordLevel({f"w{i}": i for i in range(64)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def test_a_tokenizer_config_saying_left_pads_on_the_left_and_feeds_generate(model, tmp_path):
    write_word_tokenizer(tmp_path, {"padding_side": "left", "pad_token": "w0"})
    tok = Tokenizer.from_file(tmp_path)
    assert tok.padding_side == "left"
    batch = tok(["w5 w9 w3 w17", "w40 w2"], padding=True, return_tensors="pt")
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    out = model.generate(**batch, max_new_tokens=4)
    assert out[1, 4:].tolist() == free_run(model, [40, 2], 4)


def test_a_bad_padding_side_is_refused(tmp_path):
    write_word_tokenizer(tmp_path, {"padding_side": "middle", "pad_token": "w0"})
    with pytest.raises(ValueError, match=r"padding_side='middle' is not supported; valid: 'right', 'left'"):
        Tokenizer.from_file(tmp_path)
    write_word_tokenizer(tmp_path, {"pad_token": "w0"})
    with pytest.raises(ValueError, match=r"padding_side='up' is not supported"):
        Tokenizer.from_file(tmp_path)(["w1", "w2 w3"], padding=True, padding_side="up")


# -- 2. generation_config=, use_cache=, num_beams, option lists ------------------------------------------

def test_generation_config_overrides_the_models_field_by_field(model):
    ids = torch.tensor([PROMPTS[0]])
    saved = model.generation_config
    expected = model.generate(ids, max_new_tokens=6, repetition_penalty=1.8)
    for config in ({"max_new_tokens": 6, "repetition_penalty": 1.8},
                   GenerationConfig(max_new_tokens=6, repetition_penalty=1.8)):
        assert model.generate(ids, generation_config=config).tolist() == expected.tolist()
    # keywords override it; the model's own config is untouched
    assert model.generate(ids, generation_config={"max_new_tokens": 6}, max_new_tokens=2).shape == (1, 8)
    assert model.generation_config is saved and model.generation_config.repetition_penalty is None
    # the model's fields the call's config does not set still apply
    first = free_run(model, PROMPTS[0], 6)[1]
    model.generation_config.eos_token_id = first
    try:
        assert model.generate(ids, generation_config={"max_new_tokens": 6})[0, 6:].tolist()[-1] == first
    finally:
        model.generation_config.eos_token_id = None


def test_a_bad_generation_config_is_refused_by_name(model):
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(kernelhub.SamplingError, match=r"unknown generation_config fields \['max_new_token'\]; "
                                                      r"valid: max_new_tokens, "):
        model.generate(ids, generation_config={"max_new_token": 3})
    with pytest.raises(kernelhub.ConfigError, match="'top_k' is 'x'"):
        model.generate(ids, generation_config={"top_k": "x"})
    with pytest.raises(kernelhub.SamplingError, match="generation_config must be a kernelhub GenerationConfig or a "
                                                      "dict of its fields, got list"):
        model.generate(ids, generation_config=[1])


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "seed": 3}, {"repetition_penalty": 1.5}],
                         ids=["greedy", "sampled", "penalty"])
def test_use_cache_false_recomputes_and_gives_the_same_tokens(model, options):
    ids = torch.tensor([[0, 0, 5, 9, 3, 17], [40, 2, 33, 8, 11, 19]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=8, **options)
    assert model.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=False,
                          **options).tolist() == cached.tolist()
    assert model.generate(ids, attention_mask=mask, max_new_tokens=8, use_cache=True,
                          **options).tolist() == cached.tolist()


def test_use_cache_false_refuses_a_cache_kind_and_compile(model):
    with pytest.raises(ValueError, match="use_cache=False recomputes every step without a cache; it cannot take "
                                         "cache='static'"):
        model.generate([1, 2], use_cache=False, cache="static")
    with pytest.raises(ValueError, match="use_cache must be True, False or None, got 'no'"):
        model.generate([1, 2], use_cache="no")


def test_beam_search_is_one_line_refusal(model):
    for call in (lambda: model.generate([1, 2], num_beams=4),
                 lambda: model.generate([1, 2], generation_config={"num_beams": 2})):
        with pytest.raises(kernelhub.SamplingError, match=r"^beam search is not supported; num_beams=\d asks for it"
                                                          r"[^\n]*$"):
            call()
    assert model.generate([1, 2], num_beams=1, max_new_tokens=2).shape == (1, 4)  # transformers' default: fine


def valid_list(error) -> list[str]:
    return str(error.value).split("valid: ")[1].split(", ")


def test_unknown_options_list_the_valid_names_sorted_after_a_did_you_mean(model):
    with pytest.raises(kernelhub.SamplingError, match=r"unknown generate options \['temprature'\]") as typo:
        model.generate([1, 2], temprature=0.5)
    names = valid_list(typo)
    assert names[0] == "temperature" and names[1:] == sorted(names[1:])
    assert {"generation_config", "use_cache", "streamer", "attention_mask"} <= set(names)
    with pytest.raises(kernelhub.SamplingError, match=r"unknown generate options \['zzz'\]") as nothing_close:
        model.generate([1, 2], zzz=1)
    assert valid_list(nothing_close) == sorted(names)
    with pytest.raises(kernelhub.SamplingError, match=r"unknown sampling options \['topk'\]") as batch:
        model.generate_batch([[1, 2]], topk=3)
    names = valid_list(batch)
    assert names[0] == "top_k" and names[1:] == sorted(names[1:])


# -- 3. generate_batch with min_new_tokens, repetition_penalty, stop_strings ------------------------------

def per_prompt(model, prompt, **options):
    return model.generate(torch.tensor([prompt]), **options)[0, len(prompt):].tolist()


def test_generate_batch_applies_the_per_prompt_options_as_generate_does(model):
    free = free_run(model, PROMPTS[0], 12)
    eos = free[1]  # the first prompt's second token ends it ... unless min_new_tokens holds it off
    stop = free_run(model, PROMPTS[2], 12)[3]
    cases = [{"min_new_tokens": 5, "eos_token_id": eos},
             {"repetition_penalty": 1.7},
             {"repetition_penalty": 0.7, "eos_token_id": eos},
             {"stop_strings": [f"w{stop} "]},
             {"min_new_tokens": 3, "repetition_penalty": 1.3, "eos_token_id": eos, "stop_strings": f"w{stop} "}]
    tokenizer = WordTokenizer()
    for options in cases:
        results = model.generate_batch(PROMPTS, max_new_tokens=12, tokenizer=tokenizer, **options)
        expected = [per_prompt(model, p, max_new_tokens=12, tokenizer=tokenizer, **options) for p in PROMPTS]
        assert [r.tokens for r in results] == expected, options
    held = model.generate_batch(PROMPTS[:1], max_new_tokens=12, min_new_tokens=5, eos_token_id=eos)[0]
    assert eos not in held.tokens[:5] and free[:2] != held.tokens[:2]
    stopped = model.generate_batch(PROMPTS[2:], max_new_tokens=12, stop_strings=f"w{stop} ", tokenizer=tokenizer)[0]
    assert stopped.finish_reason == "stop" and len(stopped.tokens) <= 4


def test_batched_options_apply_per_request(model):
    from kernelhub.runtime.batching import ContinuousBatcher

    tokenizer = WordTokenizer()
    stop = free_run(model, PROMPTS[1], 12)[2]
    with ContinuousBatcher(model, kv_memory=1 << 20, tokenizer=tokenizer) as batcher:
        a = batcher.add_request(PROMPTS[0], max_new_tokens=8, repetition_penalty=1.9)
        b = batcher.add_request(PROMPTS[1], max_new_tokens=8, stop_strings=[f"w{stop} "])
        c = batcher.add_request(PROMPTS[2], max_new_tokens=8)
        results = {r.request_id: r for r in batcher}
    assert results[a].tokens == per_prompt(model, PROMPTS[0], max_new_tokens=8, repetition_penalty=1.9)
    assert results[b].tokens == per_prompt(model, PROMPTS[1], max_new_tokens=8, stop_strings=[f"w{stop} "],
                                           tokenizer=tokenizer)
    assert results[b].finish_reason == "stop"
    assert results[c].tokens == free_run(model, PROMPTS[2], 8)


def test_stop_strings_in_a_batch_need_a_tokenizer_and_max_length_stays_refused(model):
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer to read the text: pass tokenizer="):
        model.generate_batch(PROMPTS, stop_strings="w1")
    with pytest.raises(kernelhub.SamplingError, match="continuous batching does not support max_length=9"):
        model.generate_batch(PROMPTS, max_length=9)


def test_generate_batch_follows_the_generation_configs_penalty(model):
    model.generation_config.repetition_penalty, model.generation_config.min_new_tokens = 0.3, 2
    try:
        results = model.generate_batch(PROMPTS, max_new_tokens=6)
        assert [r.tokens for r in results] == [per_prompt(model, p, max_new_tokens=6) for p in PROMPTS]
        unpenalised = [per_prompt(model, p, max_new_tokens=6, repetition_penalty=1.0) for p in PROMPTS]
        assert [r.tokens for r in results] != unpenalised
    finally:
        model.generation_config.repetition_penalty = model.generation_config.min_new_tokens = None


# -- 4. MoE router logits and the auxiliary loss, against transformers ------------------------------------

def moe_checkpoint(family, path):
    from checkpoints import write_family_checkpoint, write_qwen3_checkpoint

    write = write_qwen3_checkpoint if family == "qwen3_moe" else write_family_checkpoint
    return write(family, path, router_aux_loss_coef=0.25)


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])
def moe(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    reference = moe_checkpoint(request.param, path)
    return kernelhub.from_pretrained(path, attn_implementation="eager", dtype="float32"), reference, path


def padded_batch(vocab=96):
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 4] = -100  # predicted from a padding position, whose logits no one compares
    return ids, mask, labels


def test_router_logits_and_aux_loss_match_transformers(moe):
    model, reference, _ = moe
    ids, mask, labels = padded_batch()
    valid = mask.reshape(-1).bool()
    with torch.no_grad():
        ours = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        theirs = reference(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    assert len(ours.router_logits) == len(theirs.router_logits) > 0
    for a, b in zip(ours.router_logits, theirs.router_logits):
        assert a.shape == b.shape and (a[valid] - b[valid]).abs().max() <= 1e-5
    assert abs(ours.aux_loss.item() - theirs.aux_loss.item()) <= 1e-5
    assert abs(ours.loss.item() - theirs.loss.item()) <= 1e-5  # cross-entropy + 0.25 * aux_loss
    with torch.no_grad():
        plain = model(ids, attention_mask=mask, labels=labels)
    assert abs((ours.loss - plain.loss).item() - 0.25 * ours.aux_loss.item()) <= 1e-5
    assert list(ours.keys()) == ["loss", "aux_loss", "logits", "router_logits"] and ours[1] is ours.aux_loss
    with torch.no_grad():  # without a mask every row counts, as in transformers
        assert abs(model(ids, output_router_logits=True).aux_loss.item()
                   - reference(ids, output_router_logits=True).aux_loss.item()) <= 1e-5


def test_router_logits_are_off_by_default_and_on_from_the_config(moe, tmp_path):
    model, _, path = moe
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert out.aux_loss is None and out.router_logits is None and list(out.keys()) == ["logits"]
    shutil.copy(path / "model.safetensors", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "output_router_logits": True}))
    on = kernelhub.from_pretrained(tmp_path, attn_implementation="eager", dtype="float32")
    with torch.no_grad():
        assert on(ids, attention_mask=mask).aux_loss is not None
    (tmp_path / "config.json").write_text(json.dumps({**config, "router_aux_loss_coef": -1}))
    with pytest.raises(kernelhub.ConfigError, match="'router_aux_loss_coef' is -1 .*; allowed: a finite number >= 0"):
        kernelhub.explain(tmp_path)


# -- 5. tensor parallelism under a launcher, no init_process_group ---------------------------------------

RANK_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
import kernelhub

path, out, rank = sys.argv[1], sys.argv[2], sys.argv[3]
assert not dist.is_initialized()
model = kernelhub.from_pretrained(path, attn_implementation="sdpa", tp_plan="auto")  # no init_process_group
model.generation_config.eos_token_id = None
ids, mask = torch.tensor([[0, 0, 5, 7, 9, 3], [1, 5, 7, 9, 3, 4]]), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6).tolist()
result = {"tokens": tokens, "world": dist.get_world_size(), "backend": dist.get_backend(),
          "tp": model.binding.tensor_parallel["tp_size"]}
dist.destroy_process_group()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(result, f)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp_plan_under_a_launcher_initialises_the_group_itself(tmp_path):
    from checkpoints import write_hf_checkpoint
    from tests.test_tensor_parallel import kill_tree

    write_hf_checkpoint("llama", tmp_path / "llama")
    single = kernelhub.from_pretrained(tmp_path / "llama", attn_implementation="sdpa")
    single.generation_config.eos_token_id = None
    ids, mask = torch.tensor([[0, 0, 5, 7, 9, 3], [1, 5, 7, 9, 3, 4]]), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    expected = single.generate(ids, attention_mask=mask, max_new_tokens=6).tolist()
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    port = free_port()
    logs = [tmp_path / f"rank{rank}.log" for rank in (0, 1)]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(log, "w")) for log in logs]
        procs = []
        for rank in (0, 1):  # what torchrun --nproc-per-node 2 sets
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": str(rank),
                   "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), str(tmp_path / "llama"),
                                           str(tmp_path), str(rank)], cwd=ROOT, env=env, stdout=files[rank],
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 150
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail("the two ranks did not finish within 150 s")
        finally:
            for p in procs:
                kill_tree(p)
    for rank, log in enumerate(logs):
        file = tmp_path / f"rank{rank}.json"
        assert file.is_file(), f"rank {rank} wrote no result:\n{log.read_text()[-4000:]}"
        result = json.loads(file.read_text())
        assert result == {"tokens": expected, "world": 2, "backend": "gloo", "tp": 2}


def test_tp_plan_outside_a_launcher_still_says_run_under_torchrun(tiny_checkpoint, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(kernelhub.TensorParallelError, match="run under torchrun"):
        kernelhub.from_pretrained(tiny_checkpoint, tp_plan="auto")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(kernelhub.TensorParallelError, match="the environment sets RANK but not WORLD_SIZE, "
                                                            "MASTER_ADDR, MASTER_PORT; run under torchrun"):
        kernelhub.from_pretrained(tiny_checkpoint, tp_plan="auto")


# -- 6. devices this torch cannot use --------------------------------------------------------------------

def test_a_device_string_torch_does_not_know_is_one_error(tiny_checkpoint):
    with pytest.raises(kernelhub.KernelhubError, match=r"^device='tpu:99' is not a device torch knows; "
                                                       r"available: cpu"):
        kernelhub.from_pretrained(tiny_checkpoint, device="tpu:99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only torch build refuses CUDA")
@pytest.mark.parametrize("where", [{"device_map": "cuda"}, {"device": "cuda:0"}, {"device_map": {"": "cuda"}}])
def test_cuda_on_a_cpu_only_build_is_one_error_naming_the_device(tiny_checkpoint, where):
    (what, value), = where.items()
    shown = "cuda" if isinstance(value, dict) else value
    with pytest.raises(kernelhub.KernelhubError, match=rf"^{what}='{shown}' cannot be used in this process \(Torch "
                                                       r"not compiled with CUDA enabled\); available: cpu$"):
        kernelhub.from_pretrained(tiny_checkpoint, **where)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only torch build refuses CUDA")
def test_moving_to_cuda_on_a_cpu_only_build_is_one_error(model):
    plan = model.binding
    with pytest.raises(kernelhub.KernelhubError, match=r"(?i)cuda.*available: cpu"):
        model.to("cuda")
    assert model.device.type == "cpu" and model.binding is plan  # nothing moved, the plan unchanged


# -- 7. flex: no eager-mode warning where kernelhub runs it eagerly; one line before the first compile ----

def test_flex_batching_shows_no_compile_warning(tiny_checkpoint, monkeypatch):
    import torch.nn.attention.flex_attention as torch_flex

    # torch warns once per process: forget that it has, so this test sees what a fresh process sees
    monkeypatch.setattr(torch_flex, "_WARNINGS_SHOWN", set())
    model = kernelhub.from_pretrained(tiny_checkpoint, attn_implementation="paged|flex")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate_batch(PROMPTS, max_new_tokens=2)
    assert not [w for w in caught if "without torch.compile" in str(w.message)]
    monkeypatch.setattr(torch_flex, "_WARNINGS_SHOWN", set())
    with warnings.catch_warnings(record=True) as caught:  # the filter is kernelhub's call only
        warnings.simplefilter("always")
        q = torch.randn(1, 2, 4, 16)
        torch_flex.flex_attention(q, q, q)
    assert [w for w in caught if "without torch.compile" in str(w.message)]


def test_the_first_flex_compile_says_so_once(monkeypatch):
    from kernelhub.backends import flex
    from kernelhub.declare import log
    from kernelhub.declare.attention_mask import AttentionMask

    monkeypatch.setattr(log, "_once", collections.OrderedDict())  # a fresh process's once-only memory
    monkeypatch.setattr(flex, "COMPILE", True)
    monkeypatch.setattr(flex, "compiled_flex_attention", lambda: flex.flex_attention)  # no real compile here
    mask = AttentionMask.build(batch=1, q_len=4).materialize("block_mask")
    q = torch.randn(1, 2, 4, 16)
    with log.captured_logs("debug") as records:
        for _ in range(2):
            flex.flex_attention_backend(None, q, q, q, mask, scaling=0.25)
    mine = [(r.levelno, r.getMessage()) for r in records if r.name == "kernelhub.backends.flex"]
    assert mine == [(logging.INFO, "compiling flex attention for cpu/float32 (first call takes a while)")]
