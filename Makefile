# mailstack: the two commands a user needs are `make test` and (later) `make lab`.
#
#   make test                          set up this machine, lint, unit-test, run every scenario
#   make test SCENARIO=postfix         only that Molecule scenario (lint and unit tests still run)
#   make test TEST_DISTRO=debian13     on Debian 13 containers (default debian12)
#   make test TEST_DISTRO="debian12 debian13"   on both, one after the other
#   make test JOBS=2                   scenarios run two at a time
#
# Every step prints how long it took. Set-up steps are skipped when nothing they depend on changed.

SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

TEST_DISTRO ?= debian12
SCENARIO    ?=
JOBS        ?= 1
PYTHON      ?= python3

VENV    := .venv
BIN     := $(VENV)/bin
CACHE   := .cache
STAMP   := $(CACHE)/stamps
TIMED   := scripts/testbench/timed
export CONTAINERS_CONF := $(CURDIR)/$(CACHE)/containers/containers.conf
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help setup host venv images lint yamllint ansible-lint unit molecule test clean

help:
	@sed -n "3,10p" Makefile

## set-up --------------------------------------------------------------------------------
host:
	@$(TIMED) "host packages" bash scripts/testbench/setup-host.sh

$(STAMP)/venv: requirements.txt scripts/pyproject.toml
	@mkdir -p $(STAMP)
	@$(TIMED) "python environment" bash -c '\
	  test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	  $(BIN)/pip install -q --disable-pip-version-check -r requirements.txt \
	    || { echo "pip install -r requirements.txt failed" >&2; exit 1; }; \
	  $(BIN)/pip install -q --disable-pip-version-check --no-deps -e ./scripts \
	    || { echo "pip install of scripts/ failed" >&2; exit 1; }'
	@touch $@

venv: host $(STAMP)/venv

images: venv
	@for d in $(TEST_DISTRO); do \
	  $(TIMED) "images $$d" $(BIN)/mailstack-testbench images --distro $$d || exit 1; \
	done

setup: host venv images

## checks --------------------------------------------------------------------------------
yamllint: venv
	@$(TIMED) "yamllint" $(BIN)/yamllint --strict .

ansible-lint: venv
	@$(TIMED) "ansible-lint" env PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ansible-lint --offline

lint: yamllint ansible-lint

unit: venv
	@$(TIMED) "unit tests" $(BIN)/pytest -q scripts/tests

molecule: images
	@for d in $(TEST_DISTRO); do \
	  $(TIMED) "molecule $$d" env PATH="$(CURDIR)/$(BIN):$$PATH" TEST_DISTRO=$$d \
	    $(BIN)/mailstack-testbench scenarios --distro $$d --jobs $(JOBS) \
	    $(foreach s,$(SCENARIO),--scenario $(s)) || exit 1; \
	done

test: setup lint unit molecule
	@echo "make test: all checks passed on $(TEST_DISTRO)"

clean:
	rm -rf $(CACHE) $(VENV)
