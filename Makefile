# Every target builds what it needs from a clean clone; only python3 and make are assumed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

.PHONY: demo test bench bench-quick bench-peers bench-soak lint clean

# The demo needs nothing beyond the standard library: SQLite is built into Python.
demo:
	$(PYTHON) -m minflow demo

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu run: apt-get install python3-venv" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

# Most tests wait on a database or a subprocess, so three pytest workers keep two cores busy.
TEST_WORKERS ?= 3

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

BENCH_PYTEST = -m pytest -q -s -p no:cacheprovider bench

# minflow alone: S1-S3 at its defaults and over the concurrency sweep, S4, S5, import time and
# idle memory.
bench: $(STAMP)
	$(BIN)/python $(BENCH_PYTEST) --timeout 1800 -m "not peers and not soak" $(PYTEST_ARGS)

# A/B work on one change (under 3 minutes): minflow alone, its defaults beside 100 handler
# slots, fewer runs; the same tables. Each BENCH_* variable set in the environment wins.
bench-quick: $(STAMP)
	BENCH_RUNS=$${BENCH_RUNS:-3000} BENCH_SWEEP=$${BENCH_SWEEP:-100} \
	BENCH_S3_SUBMITS=$${BENCH_S3_SUBMITS:-100} BENCH_IDLE_SECONDS=$${BENCH_IDLE_SECONDS:-3} \
	$(BIN)/python $(BENCH_PYTEST) --timeout 600 -m "quick and not peers" $(PYTEST_ARGS)

# S6 and S7 (rolling restarts): ten minutes each per backend (BENCH_SOAK_SECONDS to change it).
bench-soak: $(STAMP)
	$(BIN)/python $(BENCH_PYTEST) --timeout 3600 -m soak $(PYTEST_ARGS)

$(PEERS_STAMP): pyproject.toml bench/peers-requirements.txt
	@$(PYTHON) -m venv $(PEERS_VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu run: apt-get install python3-venv" >&2; exit 1; }
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -e '.[dev]' -r bench/peers-requirements.txt
	@touch $@

# Every system at its own defaults and at its best over the sweep (BENCH_SYSTEMS to pick some).
bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python $(BENCH_PYTEST) --timeout 7200 -m peers $(PYTEST_ARGS)

# mypy: an application module written like the README's examples, checked strictly against
# minflow's annotations (minflow's own code is not reported there).
lint: $(STAMP)
	$(BIN)/python -m ruff check minflow.py tests bench examples
	$(BIN)/python -m ruff format --check minflow.py
	$(BIN)/python -m mypy --strict --follow-imports=silent tests/typed_app.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache .ruff_cache *.egg-info
