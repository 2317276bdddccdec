# `make demo` and `make test` are all a fresh clone needs: each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
WORKSPACE ?= $(CURDIR)/workspace

.PHONY: install demo test test-fast bench clean

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/train-food ingest data/food-sample --out $(WORKSPACE)/datasets/food-sample --max-side 128
	$(BIN)/train-food train --dataset $(WORKSPACE)/datasets/food-sample --storage-path $(WORKSPACE)/ray_results \
		--epochs 3 --image-size 64 --batch-size 32 --workers 1

test: $(INSTALLED)
	$(BIN)/python -m pytest

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow"

bench: $(INSTALLED)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf $(WORKSPACE) .pytest_cache
