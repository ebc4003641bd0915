# p11p — build, test, demo. `make demo` and `make test` install what is missing first.
SHELL := /bin/bash
PYTHON ?= python3
CC ?= cc
BUILD := build
P11_CFLAGS := -I/usr/include/p11-kit-1 -Iprotocol
CFLAGS_COMMON := -std=c11 -D_GNU_SOURCE -fPIC -Wall -Wextra -Werror -pthread $(P11_CFLAGS)
CFLAGS ?= -O2 -g
DEB_PACKAGES := softhsm2 opensc libp11-kit-dev p11-kit libmsgpack-dev libengine-pkcs11-openssl gcc make

.PHONY: all build deps test demo clean lint gen

all: build

include client/build.mk
-include faultsim/build.mk

# Install the Debian packages and Python packages that are missing (idempotent, quick
# when everything is there).
deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; fi
	@$(PYTHON) -c "import p11p.daemon, PyKCS11, pkcs11, pytest_asyncio, cryptography, hypothesis" 2>/dev/null || \
	  $(PYTHON) -m pip install -q --root-user-action=ignore -e '.[test]' --config-settings editable_mode=strict

build: deps $(BUILD)/p11p-client.so $(if $(wildcard faultsim/build.mk),$(BUILD)/p11p-faultsim.so)
	@$(PYTHON) -m pip install -q --root-user-action=ignore --no-deps -e . --config-settings editable_mode=strict

clean:
	rm -rf $(BUILD) *.egg-info
