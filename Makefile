# cluo — the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export CLUO_CACHE ?= /var/cache/cluo

.PHONY: deps control-plane lint test unit demo bench clean

deps:
	@bash hack/install-deps.sh

control-plane: deps
	@bash hack/build-control-plane.sh >/dev/null

lint: deps
	$(VENV)/bin/ruff check cluo_host cluo_coord tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: deps
	$(PY) -m pytest tests/unit -q

test: deps control-plane lint
	$(PY) -m pytest -q

demo: control-plane
	$(PY) -m tests.testbed.controlplane

bench: control-plane
	@echo "make bench: the benchmarks are not built yet (issue 6)" >&2; exit 1

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
