# modelhash: `make run` sets everything up and runs the main job on the embedded default;
# `make test` runs the whole suite. Both create .venv and install into it on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch lies on these machines; GPU users: make TORCH_SPEC='torch>=2.4' ...
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
DEMO := demo

.PHONY: setup run test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[dev,verify]'
	touch $(STAMP)

run: setup
	$(PY) -m bench.zoo $(DEMO)/zoo
	$(VENV)/bin/modelhash crawl $(DEMO)/zoo --index $(DEMO)/index
	$(VENV)/bin/modelhash query $(DEMO)/zoo/mlp-s0 --index $(DEMO)/index -k 20
	$(VENV)/bin/modelhash verify $(DEMO)/zoo/mlp-s0 $(DEMO)/zoo/mlp-s0-ft-prune50 $(DEMO)/zoo/mlp-s1

test: setup lint
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# Benchmarks (not in `make test`): each bench module writes its own section of bench/RESULTS.md.
bench: setup
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench.hamming
	$(PY) -m bench.crawl
	$(PY) -m bench.quality
	$(PY) -m bench.verify

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
