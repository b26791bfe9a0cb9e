"""`kernelhub run` and `kernelhub demo` end to end, as a user runs them."""

import os
import subprocess
import sys

from gguf_files import write_tiny_gguf
from kernelhub.testing.samples import minilm_dir, smollm2_gguf


def kernelhub_cli(*args, cache):
    env = dict(os.environ, KERNELHUB_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "kernelhub", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_run_answers_with_smollm2(tmp_path):
    out = kernelhub_cli("run", str(smollm2_gguf()), "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "12", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "tokens/s, attention: sdpa" in out.stderr


def test_run_with_a_layer_kernel(tmp_path):
    out = kernelhub_cli("run", str(smollm2_gguf()), "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "12", "--kernels", '{"QuantizedLinear": "gguf"}', cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_run_on_an_encoder_prints_an_embedding(tmp_path):
    out = kernelhub_cli("run", str(minilm_dir()), "--prompt", "hello", "--attn", "eager", cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sentence embedding (384 dims)" in out.stdout


def test_run_reports_bad_input_clearly(tmp_path):
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    out = kernelhub_cli("run", str(path), "--prompt", "hi", cache=tmp_path)
    assert out.returncode == 2 and "error: GGUF architecture 'gpt2' is not supported" in out.stderr
    out = kernelhub_cli("run", str(minilm_dir()), "--prompt", "hi", "--attn", "spda", cache=tmp_path)
    assert out.returncode == 2 and "Did you mean 'sdpa'" in out.stderr


def test_demo_runs_on_the_real_models(tmp_path):
    out = kernelhub_cli("demo", "--max-new-tokens", "12", cache=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "max |difference| to eager over all backends" in out.stdout
    assert "The capital of France is Paris" in out.stdout
    assert "encoder.layer.{0..5}.attention.self.attn" in out.stdout
    assert "8 prompts at once: model.generate_batch" in out.stdout
    assert "the first 3 answers equal the one-by-one answers above" in out.stdout
