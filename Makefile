# Two entry points a new user needs: `make demo` and `make test`. Each installs what it needs.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-test system-deps demo test

install:
	$(PIP) install -q -e .

# Debian's libibverbs1 lets the real mooncake_master run; installed when we are root.
system-deps:
	@if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq libibverbs1 >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq libibverbs1 >/dev/null)); \
	  else echo "note: libibverbs1 missing; tests that need the real mooncake_master will be skipped"; fi; \
	fi

install-test: system-deps
	$(PIP) install -q -e '.[test]'
	-$(PIP) install -q mooncake-transfer-engine-non-cuda

demo: install system-deps
	-$(PIP) install -q mooncake-transfer-engine-non-cuda
	pdsupervisor demo

test: install-test
	$(PYTHON) -m pytest -q -p no:cacheprovider
