# The README's two commands are `make run` and `make test`; each builds .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint openapi bench lock clean

# Every install comes from uv.lock (exact versions, hashes checked); `make lock` updates it.
# uv itself is bootstrapped with pip at the version and hashes the lock records for it.
UV := $(BIN)/uv
UV_FROM_LOCK := import tomllib; uv = next(p for p in tomllib.load(open("uv.lock", "rb"))["package"] \
	if p["name"] == "uv"); print("uv==" + uv["version"], *("--hash=" + w["hash"] for w in uv["wheels"]))
export UV_PROJECT_ENVIRONMENT := $(VENV)

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c '$(UV_FROM_LOCK)' > $(VENV)/uv-requirement.txt
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(VENV)/uv-requirement.txt

# --locked: refuse a lock that no longer matches pyproject.toml instead of quietly re-resolving.
# --compile-bytecode, as the Dockerfile's pip does: uv writes no .pyc by itself, so where
# PYTHONDONTWRITEBYTECODE is set (CI's machines) every process start, the broker's and each
# test's, compiled every dependency again (the bench's start to /readyz: 3.2 s).
$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --quiet --locked --compile-bytecode --extra dev || { echo "make: is uv.lock stale? run: make lock" >&2; exit 1; }
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

$(BENCH_STAMP): $(STAMP)
	$(UV) sync --quiet --locked --compile-bytecode --extra dev --extra bench
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

# After editing dependencies in pyproject.toml; UPGRADE=1 also moves every pin to the newest
# release its range allows. requirements/runtime.txt is what the Dockerfile installs.
lock: | $(UV)  ## re-resolve uv.lock and requirements/runtime.txt from pyproject.toml
	$(UV) lock $(if $(UPGRADE),--upgrade)
	$(UV) export --quiet --frozen --no-emit-project --output-file requirements/runtime.txt

clean:
	rm -rf $(VENV) .broker .pytest_cache .mypy_cache .ruff_cache .hypothesis
