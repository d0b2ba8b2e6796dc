# Two entry points for a fresh machine:
#   make demo   - set up .venv and run the end-to-end demo on the embedded model
#   make test   - set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tide-installed

.PHONY: setup demo test clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU wheel; installing it in the same command keeps the resolver from pulling a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0 -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/tide demo --out runs/demo

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
