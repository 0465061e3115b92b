# mailstack: the two commands a user needs are `make lab` and `make test`.
#
#   make lab                           set up this machine, bring the whole stack up in containers
#   make lab LAB_DISTRO=debian13       the lab on Debian 13 containers (default debian12)
#   make test                          set up this machine, lint, unit-test, run every scenario and the lab
#   make test SCENARIO=postfix         only that scenario (lint and unit tests still run); SCENARIO=lab: the lab
#   make test TEST_DISTRO="debian12 debian13"   on both releases (default debian12)
#   make test JOBS=1                   one job (a scenario or the lab proof on one release) at a time
#
# Every step prints how long it took. Set-up steps are skipped when nothing they depend on changed.

SHELL       := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

TEST_DISTRO ?= debian12
SCENARIO    ?=
JOBS        ?= 2
LAB_DISTRO  ?= debian12
PYTHON      ?= python3

VENV    := .venv
BIN     := $(VENV)/bin
CACHE   := .cache
STAMP   := $(CACHE)/stamps
TIMED   := scripts/testbench/timed
export CONTAINERS_CONF := $(CURDIR)/$(CACHE)/containers/containers.conf
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help setup host venv tools hooks images lint yamllint ansible-lint unit suite lab test clean

help:
	@sed -n "3,11p" Makefile

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

venv: host $(STAMP)/venv hooks

# promtool and mtail for the unit tests of the alert rules and the mail log programs, unpacked
# from Debian's packages into .cache/tools/bin (not installed: no service starts here).
tools: host
	@$(TIMED) "monitoring tools" bash scripts/testbench/setup-tools.sh $(CACHE)/tools
	@$(TIMED) "node producer" bash scripts/testbench/setup-node.sh $(CACHE)/node

# A clear-text vault file cannot be committed by accident (scripts/githooks/pre-commit).
hooks:
	@if git rev-parse --git-dir >/dev/null 2>&1 && \
	    [ "$$(git config core.hooksPath)" != scripts/githooks ]; then \
	  git config core.hooksPath scripts/githooks && echo "git hooks: scripts/githooks (refuses clear-text vault files)"; \
	fi

images: venv
	@for d in $(TEST_DISTRO); do \
	  $(TIMED) "images $$d" $(BIN)/mailstack-testbench images --distro $$d || exit 1; \
	done

setup: host venv tools images

## checks --------------------------------------------------------------------------------
yamllint: venv
	@$(TIMED) "yamllint" $(BIN)/yamllint --strict .

ansible-lint: venv
	@$(TIMED) "ansible-lint" env PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ansible-lint --offline

lint: yamllint ansible-lint

unit: venv tools
	@$(TIMED) "unit tests" $(BIN)/pytest -q scripts/tests

# Every Molecule scenario and the lab proof on each release in TEST_DISTRO (the unit tests first),
# each step timed; ends with one table and the line "N passed, N failed".
# `.venv/bin/mailstack-testbench profile` then prints where the time went.
suite: images
	@env PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mailstack-testbench run $(foreach d,$(TEST_DISTRO),--distro $(d)) --jobs $(JOBS) \
	  $(foreach s,$(SCENARIO),--scenario $(s))

## the lab ---------------------------------------------------------------------------------
lab: host venv
	@$(TIMED) "lab ($(LAB_DISTRO))" $(BIN)/mailstack lab up --distro $(LAB_DISTRO)

test: setup lint suite

clean:
	rm -rf $(CACHE) $(VENV)
