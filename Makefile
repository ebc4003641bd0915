# p11p — build, test, demo. `make demo` and `make test` install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
CC ?= cc
BUILD := build
P11_CFLAGS := -I/usr/include/p11-kit-1 -Iprotocol
CFLAGS_COMMON := -std=c11 -D_GNU_SOURCE -fPIC -Wall -Wextra -Werror -pthread $(P11_CFLAGS)
CFLAGS ?= -O2 -g
DEB_PACKAGES := softhsm2 opensc libp11-kit-dev p11-kit libmsgpack-dev libengine-pkcs11-openssl \
                openssl gcc make python3-dev swig gnutls-bin p11-kit-modules systemd util-linux
PYTEST_ARGS ?=

.PHONY: all build deps test demo clean lint gen-check pytest bench install soak

all: build

include client/build.mk
include faultsim/build.mk
include helper/build.mk
-include bench/build.mk
-include fuzz/build.mk
-include install.mk

# Debian and Python packages that are missing get installed (quick when all are there).
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	@$(PYTHON) -c "import msgpack, uvloop, cffi, PyKCS11, pkcs11, pytest_asyncio, pytest_timeout, cryptography, hypothesis, ruff, mypy, atheris" 2>/dev/null || \
	  { echo "installing Python packages"; $(PYTHON) -m pip install -q --root-user-action=ignore -e '.[test]' --config-settings editable_mode=strict; }

build: deps $(BUILD)/p11p-client.so $(BUILD)/asan/p11p-client.so $(BUILD)/p11p-faultsim.so helper-cffi
	@$(PYTHON) -m pip install -q --root-user-action=ignore --no-deps -e . --config-settings editable_mode=strict
	@command -v p11p >/dev/null || { echo "p11p is not on PATH"; exit 1; }

# Generated files must be what their generators make now.
gen-check:
	$(PYTHON) protocol/gen_constants.py --check
	$(PYTHON) protocol/gen_requests.py --check
	$(PYTHON) client/gen.py --check
	$(PYTHON) helper/gen_fast.py --check
	$(PYTHON) faultsim/gen.py --check

lint:
	ruff check daemon helper protocol tests client
	mypy -p p11p.daemon -p p11p.protocol -p p11p.helper

# The suite in two pytest processes at once (its tests mostly wait on daemons, helpers
# and tokens; two cores): tests/ha and the benchmark in one, the rest in the other. Each
# prints its own summary; either failing, or running no test (pytest's 5), fails make.
# PYTEST_ARGS (a subset, say) runs one process.
PYTEST_A := tests/ha tests/bench
PYTEST_B := $(filter-out $(PYTEST_A) tests/__pycache__,$(patsubst %/,%,$(sort $(dir $(wildcard tests/*/)))))
pytest:
ifneq ($(strip $(PYTEST_ARGS)),)
	$(PYTHON) -m pytest -q --durations=15 $(PYTEST_ARGS)
else
	@a=$$(mktemp); b=$$(mktemp); \
	$(PYTHON) -m pytest -q --durations=10 $(PYTEST_A) > $$a 2>&1 & pa=$$!; \
	$(PYTHON) -m pytest -q --durations=10 $(PYTEST_B) > $$b 2>&1 & pb=$$!; \
	wait $$pa; ra=$$?; wait $$pb; rb=$$?; \
	echo "== pytest $(PYTEST_A)"; cat $$a; echo "== pytest $(PYTEST_B)"; cat $$b; rm -f $$a $$b; \
	echo "pytest exit codes: $$ra (ha, bench), $$rb (the rest)"; [ $$ra -eq 0 ] && [ $$rb -eq 0 ]
endif

# The whole suite. Exits non-zero on any failure, and when no test ran (pytest's 5).
test: build gen-check lint pytest

demo: build
	@bash demo/demo.sh

# Model-based differential tests (tests/model) with random seeds for SOAK_MINUTES minutes,
# split between the policies; stops at the first discrepancy with its shrunk sequence.
SOAK_MINUTES ?= 30
soak: build
	$(PYTHON) tests/model/soak.py --minutes $(SOAK_MINUTES)

# Speed and footprint against the direct module and p11-kit's remoting (not in `make test`).
bench: build $(BUILD)/p11bench
	$(PYTHON) bench/run.py

# Installs the client library, the fault module, a p11-kit module file and the units.
install: build
	$(MAKE) install-files

clean:
	rm -rf $(BUILD) *.egg-info
