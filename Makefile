# edgefed — `make demo` and `make test` set up whatever is missing on a fresh Debian machine
# (Python 3.11, root, no GPU, only package registries reachable), then run.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# Re-install when the declared dependencies change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := mosquitto dataset-fashion-mnist postgresql
PYTEST_ARGS ?=

.PHONY: help setup apt venv demo test lint clean

help:
	@echo "make demo   - set up what is missing, then run the whole loop (edgefed demo)"
	@echo "make test   - set up what is missing, then run the test suite"
	@echo "make setup  - only set up (apt packages + virtualenv at $(VENV))"
	@echo "make lint   - ruff"

setup: apt venv

# Debian packages: the MQTT broker, the Fashion-MNIST reference data, and PostgreSQL (the test suite
# runs the database tests on a throwaway cluster too: tests/postgres_fixtures.py starts and stops it).
apt:
	@missing=""; \
	{ command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ]; } || missing="$$missing mosquitto"; \
	[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || missing="$$missing dataset-fashion-mnist"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq; \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	# torch==2.13.0 (pinned in pyproject) is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(BIN)/edgefed demo

test: setup
	$(BIN)/ruff check edge_agent cloud_hub federation shared tests
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check edge_agent cloud_hub federation shared tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-output
