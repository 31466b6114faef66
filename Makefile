# The README's two commands are `make run` and `make test`; each builds .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint openapi clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)  ## migrate and serve; with no MP_* credentials, a demo on the built-in simulator
	$(BIN)/broker run

test: $(STAMP)  ## the whole suite on a real PostgreSQL (embedded unless DATABASE_URL is set)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

openapi: $(STAMP)  ## regenerate openapi/openapi.json from the app
	$(BIN)/broker openapi

clean:
	rm -rf $(VENV) .broker .pytest_cache .mypy_cache .ruff_cache .hypothesis
