# Two commands do all set-up on a fresh machine:
#   make up    run the product (Prefect on SQLite, UI on http://127.0.0.1:4200, every runbook served)
#   make test  install what the tests need and run the whole suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint venv system-deps bench clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

system-deps:
	@bash scripts/install-system-deps.sh

up: venv
	$(BIN)/runbooks up

# two pytest processes: most integration tests wait on servers, so two halve the wall time on
# two cores; `--dist loadgroup` keeps each group of tests (tests/conftest.py) on one process
TEST_WORKERS ?= 2

test: venv system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

lint: venv
	$(BIN)/ruff check runbooks serving flows tasks blocks deployments alert_gateway tests bench

bench: venv system-deps
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
