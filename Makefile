# The README's two commands are `make run` and `make test`; each builds .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint openapi bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)  ## migrate and serve; with no MP_* credentials, a demo on the built-in simulator
	$(BIN)/broker run

# A worker per core, each with its own embedded PostgreSQL (or its own databases on DATABASE_URL).
PYTEST := $(BIN)/pytest -n auto --dist worksteal

test: $(STAMP)  ## the whole suite on a real PostgreSQL (embedded unless DATABASE_URL is set), with coverage
	$(PYTEST) --cov=service --cov-report=term

test-fast: $(STAMP)  ## the inner loop: everything but the chaos, soak, fuzz and browser tests
	$(PYTEST) -m "not chaos and not soak and not fuzz and not browser"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

openapi: $(STAMP)  ## regenerate openapi/openapi.json from the app
	$(BIN)/broker openapi

BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS  ?=

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

# Not part of `make test`. Options: make bench BENCH_ARGS='--sellers 1000000 --skip-wave'.
bench: $(BENCH_STAMP)  ## the benchmark (bench/README.md): writes bench/RESULTS.md and results.png
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=; \
	  elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	  else echo "make bench: wrk is missing; install it as root: apt-get install -y wrk" >&2; exit 1; fi; \
	  command -v apt-get >/dev/null 2>&1 || { \
	    echo "make bench: wrk is missing and there is no apt-get: install wrk (4.x) yourself" >&2; exit 1; }; \
	  echo "make bench: installing wrk (Debian's package)"; \
	  $$sudo apt-get install -y wrk || { $$sudo apt-get update && $$sudo apt-get install -y wrk; } || { \
	    echo "make bench: could not install wrk: apt-get install -y wrk" >&2; exit 1; }; \
	}
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .broker .pytest_cache .mypy_cache .ruff_cache .hypothesis
