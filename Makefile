# Quick start: `make run` (set up, then serve the default emulated NPUs at /dev/flexnpu) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MOUNT ?= /dev/flexnpu

.PHONY: setup run test lint bench clib

setup: $(STAMP) clib

$(STAMP): setup.cfg pyproject.toml scripts/install-system-deps
	scripts/install-system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# libascendcl.so, the AscendCL C client (clib/Makefile says why a plain Makefile)
clib: $(STAMP)
	$(MAKE) -C clib PYTHON=$(abspath $(BIN)/python)

run: setup
	$(BIN)/vdevfsd mount $(MOUNT)

# pytest exits 5 when it collected no tests: that is a failure too.
test: setup
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/vdevctl bench rt
