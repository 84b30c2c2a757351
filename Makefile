# Every target builds what it needs from a clean clone; only python3 and make are assumed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

.PHONY: demo test bench bench-peers bench-soak lint clean

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

bench: $(STAMP)
	$(BIN)/python -m pytest -q -s -p no:cacheprovider bench --timeout 900 -m "not peers and not soak" $(PYTEST_ARGS)

# S6: ten minutes per backend (BENCH_SOAK_SECONDS to change it).
bench-soak: $(STAMP)
	$(BIN)/python -m pytest -q -s -p no:cacheprovider bench --timeout 3600 -m soak $(PYTEST_ARGS)

$(PEERS_STAMP): pyproject.toml bench/peers-requirements.txt
	@$(PYTHON) -m venv $(PEERS_VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu run: apt-get install python3-venv" >&2; exit 1; }
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet -e '.[dev]' -r bench/peers-requirements.txt
	@touch $@

bench-peers: $(PEERS_STAMP)
	$(PEERS_VENV)/bin/python -m pytest -q -s -p no:cacheprovider bench --timeout 3600 -m peers $(PYTEST_ARGS)

# mypy: an application module written like the README's examples, checked strictly against
# minflow's annotations (minflow's own code is not reported there).
lint: $(STAMP)
	$(BIN)/python -m ruff check minflow.py tests bench examples
	$(BIN)/python -m ruff format --check minflow.py
	$(BIN)/python -m mypy --strict --follow-imports=silent tests/typed_app.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache .ruff_cache *.egg-info
