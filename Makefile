# devagent — the two commands of the quick start are `make demo` and `make test`.
# Every target installs what it needs and is idempotent: a second run skips what is done.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEB_PACKAGES := qemu-system-x86 qemu-utils busybox-static cpio iproute2 libnbd-bin gcc make \
                python3-venv iputils-ping tcpdump openssl
# libvirt's daemon and clients for `lab up --libvirt`, and what libvirt-python builds against;
# without their recommends (no dnsmasq, no firewall, no daemon started by the packages).
DEB_LIBVIRT := libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev \
               pkg-config python3-dev
PYTEST_ARGS ?=

.PHONY: all deps venv guest demo test lint sizes unit clean

all: test

# Debian packages: apt-get runs only when one of them is missing.
deps:
	@$(call apt_install,$(DEB_PACKAGES),)
	@$(call apt_install,$(DEB_LIBVIRT),--no-install-recommends)

# $(call apt_install,PACKAGES,OPTIONS): apt-get runs only when one of them is missing.
define apt_install
missing=$$(for p in $(1); do \
    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
  done); \
if [ -n "$$missing" ]; then \
  echo "installing Debian packages:" $$missing; \
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(2) $$missing; \
fi
endef

# The virtual environment with devagent in editable mode; rebuilt when pyproject.toml changes.
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml | deps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,libvirt]'
	@touch $@

# The test guest (kernel, initramfs with ioprobe) in the cache folder; skipped when present.
guest: venv
	$(BIN)/devagent guest build

demo: deps venv guest
	$(BIN)/devagent demo

# Size limits: modules in src/ at most 600 lines, functions in daemon/ and agent/ at most 60.
sizes: venv
	$(BIN)/python tools/check_sizes.py

lint: venv sizes
	$(BIN)/ruff check src tests tools
	$(BIN)/ruff format --check src tests tools
	$(BIN)/mypy

test: deps venv guest lint
	$(BIN)/pytest -q -rs $(PYTEST_ARGS)

unit: venv
	$(BIN)/pytest -q -m 'not vm and not lab' $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
