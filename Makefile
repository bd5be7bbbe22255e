# Two entry points a new user needs: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3

# A distribution's own Python (Debian, Ubuntu) refuses `pip install` (PEP 668): use a
# virtual environment there. Elsewhere (pyenv, a venv you activated) install in place.
EXTERNALLY_MANAGED := $(shell $(PYTHON) -c "import os, sysconfig; print(int(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))))")
ifeq ($(EXTERNALLY_MANAGED),1)
VENV := .venv
PY := $(VENV)/bin/python
SCRIPTS := $(abspath $(VENV)/bin)
else
VENV :=
PY := $(PYTHON)
SCRIPTS := $(shell $(PYTHON) -c "import sysconfig; print(sysconfig.get_path('scripts'))")
endif
PIP := $(PY) -m pip
# Console scripts installed with the packages (mooncake_master, etcd) must be on PATH.
RUN := PATH="$(SCRIPTS):$$PATH"

.PHONY: install install-test system-deps demo test lint

.venv:
	$(PYTHON) -m venv .venv || { echo "python3 -m venv failed: install Debian's python3-venv"; exit 1; }

install: $(VENV)
	$(PIP) install -q -e .

# Debian's libibverbs1 lets the real mooncake_master run; installed when we are root.
system-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq libibverbs1 >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libibverbs1 >/dev/null)); \
	  else echo "note: libibverbs1 missing; tests that need the real mooncake_master will be skipped"; fi; \
	fi

install-test: $(VENV) system-deps
	$(PIP) install -q -e '.[test]'
	-$(PIP) install -q mooncake-transfer-engine-non-cuda

demo: install system-deps
	-$(PIP) install -q mooncake-transfer-engine-non-cuda
	$(RUN) $(PY) -m pdsupervisor demo

test: install-test
	$(RUN) $(PY) -m pytest -q -p no:cacheprovider

# Static checks: lint and import order (ruff), the layering contracts (import-linter), types (mypy).
lint: $(VENV)
	$(PIP) install -q -e '.[lint]'
	$(RUN) $(PY) -m ruff check .
	$(RUN) lint-imports
	$(RUN) $(PY) -m mypy
