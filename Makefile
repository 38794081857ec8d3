# One-command set-up: every target creates .venv and installs what it needs.
# torch 2.13.0 is installed first, on its own: a plain `torch` requirement would pull a CUDA build.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
WORKERS ?= 2

.PHONY: install ladder test fuzz bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The main job: the complexity-ladder report (quick preset, CPU-sized) into runs/ladder-quick.
ladder: $(STAMP)
	$(BIN)/ea ladder --preset quick --out runs/ladder-quick --workers $(WORKERS)

## The test suite.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(WORKERS) tests

## The long backend fuzz (nightly-style; `make test` runs a fixed 500 examples): EA_FUZZ_EXAMPLES to change
## the count (20000: ~20 min on one core). Failures are kept in .hypothesis/ and replayed first next time.
fuzz: $(STAMP)
	EA_FUZZ=nightly $(BIN)/python -m pytest -q -n 0 tests/ops/test_fuzz_backends.py --hypothesis-show-statistics

## EA vs SDPA timings and memory on this machine.
bench: $(STAMP)
	$(BIN)/ea bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
