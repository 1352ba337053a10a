# Two commands matter: `make demo` and `make test`. Each creates/refreshes .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck bench bench-scale venv clean example-retry

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools>=69" wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	@# setuptools serves this editable install through an import hook, which type
	@# checkers cannot follow; a path entry lets a project's mypy find stem and its
	@# py.typed too (tests/typing/test_installed_package.py).
	$(BIN)/python -c "import sys, sysconfig; open(sysconfig.get_paths()['purelib'] + '/stem-tasks-typing.pth', 'w').write(sys.argv[1] + '\\n')" "$(CURDIR)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/hello/run_demo.py

# A flaky task retried on SQLite, each retry printed by signal receivers (examples/retry_task).
example-retry: $(STAMP)
	$(BIN)/python examples/retry_task/run.py

lint: $(STAMP)
	$(BIN)/ruff check stem cli tests bench examples
	$(BIN)/mypy stem tests/typing/pass_*.py

test: lint
	$(BIN)/python -m pytest -n 2 -q

# The raw floor scripts live beside the repository during development only.
FLOORS ?= ../shared/bench
bench: $(STAMP)
	$(BIN)/python -m bench.run --floor-dir $(FLOORS)

# Scale and cost growth (bench/scale.py): big backlogs, 2 workers vs 1, 50k tasks due at
# one moment, a worker's RSS over 200k tasks. SCALE=0.1 for a quick check.
SCALE ?= 1
bench-scale: $(STAMP)
	$(BIN)/python -m bench.scale --scale $(SCALE)

clean:
	rm -rf $(VENV) .stem .pytest_cache .mypy_cache .ruff_cache
