# Two entry points for a fresh machine:
#   make demo   - set up .venv and run the end-to-end demo on the embedded model
#   make test   - set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tide-installed

.PHONY: setup system-deps demo test clean

# Debian packages the project uses: the real labelled data behind the embedded model, and the headless
# browser the dashboard tests open pages in.
DEBS     := dataset-fashion-mnist chromium chromium-driver
FMNIST   := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
BROWSER  := /usr/bin/chromedriver
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT      := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends

$(FMNIST) $(BROWSER):
	$(APT) $(DEBS) || ($(SUDO) apt-get update && $(APT) $(DEBS))

system-deps: $(FMNIST) $(BROWSER)

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the CPU wheel; installing it in the same command keeps the resolver from pulling a CUDA build
	$(BIN)/pip install --quiet torch==2.13.0 -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: system-deps $(STAMP)

demo: setup
	$(BIN)/tide demo --out runs/demo --overwrite

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
