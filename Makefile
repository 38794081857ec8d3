# One-command set-up: every target creates its venv and installs what it needs.
# torch 2.13.0 is installed first, on its own: a plain `torch` requirement would pull a CUDA build.
# `make install` / `make test` (and so CI) install the exact versions in constraints.txt, the ones the suite
# was last green with; `make test-latest` installs the newest versions pyproject's ranges allow, to find drift.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
WORKERS ?= 2
PIN     := -c constraints.txt
LATEST  ?= .venv-latest

.PHONY: install ladder test test-latest lock fuzz bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(PIN) --upgrade pip
	$(BIN)/pip install -q $(PIN) "$(TORCH)"
	$(BIN)/pip install -q $(PIN) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The main job: the complexity-ladder report (quick preset, CPU-sized) into runs/ladder-quick.
ladder: $(STAMP)
	$(BIN)/ea ladder --preset quick --out runs/ladder-quick --workers $(WORKERS)

## The test suite, on the pinned versions (constraints.txt).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) tests

## The test suite on the newest versions the dependency ranges allow (torch stays $(TORCH)), in a fresh $(LATEST).
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q "$(TORCH)"
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" "$(TORCH)"  # torch stays $(TORCH)
	$(LATEST)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' > $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q -n $(WORKERS) tests

## After a green `make test-latest`: pin its versions (constraints.txt), so `make test` and CI get them.
lock:
	test -s $(LATEST)/versions.txt || { echo "run make test-latest first"; exit 2; }
	{ echo "# The exact versions the test suite was last green with (make test-latest, then make lock)."; \
	  echo "# make install / make test / CI install with -c constraints.txt; pyproject keeps the ranges."; \
	  cat $(LATEST)/versions.txt; } > constraints.txt
## The long backend fuzz (nightly-style; `make test` runs a fixed 500 examples): EA_FUZZ_EXAMPLES to change
## the count (20000: ~20 min on one core). Failures are kept in .hypothesis/ and replayed first next time.
fuzz: $(STAMP)
	EA_FUZZ=nightly $(BIN)/python -m pytest -q -n 0 tests/ops/test_fuzz_backends.py --hypothesis-show-statistics

## EA vs SDPA timings and memory on this machine.
bench: $(STAMP)
	$(BIN)/ea bench ops

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info src/*.egg-info
