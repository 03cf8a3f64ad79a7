# Two commands set everything up on a fresh machine: `make run` (a short MNIST run on a local
# embedded Ray) and `make test`. Both create .venv and install the package first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test test-fast lint install clean

# --no-cache-dir: pip's cache would keep a second copy of torch's CUDA wheels (about 3 GB) on disk
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -e ".[dev,tracking]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/es-service train --config configs/quick.yaml --run-dir runs/quick --force

test: lint
	$(BIN)/python -m pytest -q

# ruff's lint and format check (settings in pyproject.toml); `$(BIN)/ruff format .` applies the format
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# the layer without Ray and without CLI subprocesses
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not ray and not e2e"

clean:
	rm -rf $(VENV) runs
