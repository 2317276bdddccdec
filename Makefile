# `make demo` and `make test` are all a fresh clone needs: each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
WORKSPACE ?= $(CURDIR)/workspace

.PHONY: install browser demo test test-fast bench clean clean-datasets clean-registry
CHROMIUM ?= /usr/bin/chromium

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar off -e '.[dev]'
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	BIN=$(BIN) WORKSPACE=$(WORKSPACE) bash infra/demo.sh

# The page test drives a real headless Chromium: Debian's package (Playwright's own download cannot work here).
browser:
	test -x $(CHROMIUM) || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

test: $(INSTALLED) browser
	$(BIN)/python -m pytest

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow"

bench: $(INSTALLED)
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/cpu_speed.py
	$(BIN)/python bench/tune_efficiency.py

# Only ever inside $(CURDIR)/workspace; datasets and the MLflow registry only when named.
clean:
	bash infra/clean.sh scratch "$(WORKSPACE)"
	rm -rf .pytest_cache

clean-datasets:
	bash infra/clean.sh datasets

clean-registry:
	bash infra/clean.sh registry
