# One way to do each thing: CI, the Dockerfile and people all call these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXP ?= tiny
# uv does not read pip's configuration: hand it pip's find-links (a local wheel folder) when there is one,
# so the pinned CPU torch is taken from disk instead of downloading a CUDA build.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS := $(if $(FIND_LINKS),--find-links $(FIND_LINKS),)

.PHONY: help setup train check test test-all lint format bench clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install --python $(BIN)/python $(UV_FLAGS) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed  ## create .venv and install the project with its dev tools

train: setup  ## train EXP (default: tiny, offline on CPU in minutes)
	EXP=$(EXP) $(BIN)/python entrypoint.py train

check: setup  ## validate EXP's config and environment, download nothing
	EXP=$(EXP) $(BIN)/python entrypoint.py check

test: setup  ## the default test suite (~10 min on 2 cores; never touches the network)
	$(BIN)/python -m pytest -q

test-all: setup  ## every test, the container build and the slow runs included
	$(BIN)/python -m pytest -q -m ""

lint: setup  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf outputs .pytest_cache .ruff_cache
