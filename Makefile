# cluo — the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export CLUO_CACHE ?= /var/cache/cluo

.PHONY: deps control-plane lint test unit demo bench clean artifact image

# `make artifact`: cluo-agent's systemd-sysext image and its sha512 in $(ARTIFACT_DIR)
# (hack/build-agent-artifact.sh; SYSEXT_ID=_any builds one that merges on any distribution).
ARTIFACT_DIR ?= build
SYSEXT_ID ?= flatcar

deps:
	@bash hack/install-deps.sh

control-plane: deps
	@bash hack/build-control-plane.sh >/dev/null
	@bash hack/build-kwok.sh >/dev/null
	@bash hack/build-fleetlock-client.sh >/dev/null

lint: deps
	$(VENV)/bin/ruff check cluo cluo_host cluo_coord testbed tests bench ignition hack
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

unit: deps
	$(PY) -m pytest tests/unit -q

test: deps control-plane lint
	$(PY) -m pytest -q

# `make demo`: three nspawn hosts rolled by cluo-coord, watched live (testbed/demo.py;
# it builds the Debian root and the agent's sysext image itself, cached in $(CLUO_CACHE)).
demo: deps control-plane
	$(PY) -m testbed.demo

bench: control-plane
	$(PY) -m bench --output docs/benchmarks.md

artifact: deps
	@$(PY) -c 'import PyInstaller' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[agent,build]'
	OUT_DIR=$(ARTIFACT_DIR) VENV=$(VENV) SYSEXT_ID=$(SYSEXT_ID) bash hack/build-agent-artifact.sh

# `make image`: cluo-coord's container image, localhost/cluo-coord:VERSION in podman's
# storage and an OCI archive with its digest in $(ARTIFACT_DIR), built with no registry
# (hack/build-coord-image.sh; its Debian bases are cached in $(CLUO_CACHE)).
image: deps
	@OUT_DIR=$(ARTIFACT_DIR) VENV=$(VENV) bash hack/build-coord-image.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
