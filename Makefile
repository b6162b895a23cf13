# One way to do each thing: CI, the Dockerfile and people all call these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXP ?= mini
# uv does not read pip's configuration: hand it pip's find-links (a local wheel folder) when there is one,
# so the pinned CPU torch is taken from disk instead of downloading a CUDA build.
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
UV_FLAGS := $(if $(FIND_LINKS),--find-links $(FIND_LINKS),)

.PHONY: help setup constraints train check test test-slow test-container test-all lint format bench bench-data clean build-image run-image push-image

help:  ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# docker/constraints.txt pins every package to the version the tests last passed with; the image installs the
# same set, so a new release upstream cannot change what a build gets. `make constraints` rewrites it.
$(VENV)/.installed: pyproject.toml docker/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check uv
	$(BIN)/uv pip install --python $(BIN)/python $(UV_FLAGS) -c docker/constraints.txt -e ".[dev]"
	touch $@

constraints: setup  ## pin .venv's versions for make setup and the image (after upgrading it and passing the tests)
	{ echo "# Written by make constraints: the versions the tests passed with (torch is pinned in pyproject.toml)."; \
	  $(BIN)/uv pip freeze --python $(BIN)/python | grep -v -E '^(-e |torch==|pip==|setuptools==|wheel==|uv==)'; \
	} > docker/constraints.txt

setup: $(VENV)/.installed  ## create .venv and install the project with its dev tools

train: setup  ## train EXP (default mini: offline on CPU, WER falls in minutes) as the image does: one process per GPU (ARGS=overrides)
	EXP=$(EXP) PYTHON=$(abspath $(BIN)/python) docker/start.sh train $(ARGS)

check: setup  ## validate EXP's config and environment, download nothing
	EXP=$(EXP) $(BIN)/python entrypoint.py check

test: setup  ## the default test suite (~2 min on 2 cores; never touches the network)
	$(BIN)/python -m pytest -q

test-slow: setup  ## the slow tests: end-to-end runs, several processes, the real-size rehearsal (CI runs them)
	$(BIN)/python -m pytest -q -m slow --durations=10

test-container: setup  ## build, run and push the real image with podman (CI runs them; needs podman, see docs/image.md)
	$(BIN)/python -m pytest -q -m container --durations=10

test-all: setup  ## every test, the container build and the slow runs included
	$(BIN)/python -m pytest -q -m ""

bench: setup  ## a training step against its irreducible parts, a naive baseline and torch.compile (BENCH_ARGS; CPU is fine)
	$(BIN)/python -m tools.bench.step $(BENCH_ARGS)

bench-data: setup  ## data-pipeline throughput per CPU core and padding, with and without bucketing
	$(BIN)/python -m tools.bench.data

lint: setup  ## ruff
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf outputs .pytest_cache .ruff_cache

# --- The image (Dockerfile; docker/README.md) -------------------------------------------------------------------
# The same targets work with podman and a local registry, e.g.
#   make build-image DOCKER=podman WHEELS=/opt/wheels BASE_IMAGE=localhost/debian-base:bookworm
#   make push-image DOCKER=podman REGISTRY=127.0.0.1:5000 OWNER=me PUSH_ARGS=--tls-verify=false
DOCKER ?= docker
REGISTRY ?= ghcr.io
OWNER ?= tiny-audio
IMAGE ?= $(REGISTRY)/$(OWNER)/tiny-audio
REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
TAG ?= $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
VERSION := $(shell $(PYTHON) -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
# On a version tag (v1.2.3) the image is also pushed as 1.2.3.
GIT_VERSION := $(patsubst v%,%,$(shell git describe --exact-match --tags --match 'v*' 2>/dev/null))
BASE_IMAGE ?=
# A local folder of wheels (podman only: bind-mounted into the build); torch then comes from it, not a CUDA index.
WHEELS ?=
# A CA bundle for pip where TLS is intercepted; passed as a build secret, never stored in a layer.
PIP_CA ?= $(PIP_CERT)
BUILD_ARGS ?=
RUN_ARGS ?=
PUSH_ARGS ?=
comma := ,

build-image:  ## build $(IMAGE):$(TAG) and :latest (BASE_IMAGE, WHEELS, PIP_CA, BUILD_ARGS to adapt)
	$(DOCKER) build \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) \
		$(if $(WHEELS),--volume $(abspath $(WHEELS)):/wheels:ro --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX_URL=) \
		$(if $(PIP_CA),--secret id=pip_ca$(comma)src=$(PIP_CA)) \
		--build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) \
		$(BUILD_ARGS) -t $(IMAGE):$(TAG) -t $(IMAGE):latest .

run-image:  ## train EXP in the image, outputs in ./outputs (RUN_ARGS="--gpus all" for GPUs; ARGS=overrides)
	mkdir -p outputs
	$(DOCKER) run --rm -e EXP=$(EXP) -v $(CURDIR)/outputs:/workspace/outputs $(RUN_ARGS) $(IMAGE):$(TAG) $(ARGS)

push-image:  ## push $(IMAGE):$(TAG), :latest and, on a version tag, :VERSION
	$(DOCKER) push $(PUSH_ARGS) $(IMAGE):$(TAG)
	$(DOCKER) push $(PUSH_ARGS) $(IMAGE):latest
	$(if $(GIT_VERSION),$(DOCKER) tag $(IMAGE):$(TAG) $(IMAGE):$(GIT_VERSION))
	$(if $(GIT_VERSION),$(DOCKER) push $(PUSH_ARGS) $(IMAGE):$(GIT_VERSION))
