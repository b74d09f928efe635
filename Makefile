# The two commands of the README, plus their building blocks.
#   make demo   set up .venv and run the main job (dcgrpo demo)
#   make test   set up .venv and .venv-verl and run the whole test suite
.PHONY: setup setup-verl demo test lint clean images

setup:
	@bash scripts/setup.sh cpu

setup-verl:
	@bash scripts/setup.sh verl

demo: setup
	.venv/bin/dcgrpo demo $(ARGS)

test: setup setup-verl
	@bash scripts/test.sh

lint: setup
	.venv/bin/ruff check src tests components pipelines benchmarks
	.venv/bin/ruff format --check src tests components pipelines benchmarks

clean:
	rm -rf .venv .venv-verl outputs .pytest_cache .ruff_cache

# Container images: containers/Dockerfile.<name> -> $(REGISTRY)/<name>:$(TAG), built and pushed
# (the names src/dcgrpo/deploy.py expects). Each installs its lock, containers/<name>.lock
# (scripts/resolve_locks.sh checks or updates them; no docker needed for that).
#   make images REGISTRY=ghcr.io/you TAG=0.1.0 [IMAGES="light gpu"] [PUSH=0]
REGISTRY ?= ghcr.io/dcgrpo
TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGES ?= light gpu verl
PUSH ?= 1

images:
	@command -v docker >/dev/null 2>&1 || { echo "make images: docker not found; it needs a Docker engine (docker build + push). The locks can be checked without one: bash scripts/resolve_locks.sh" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make images: docker cannot reach a Docker engine (is the daemon running?)" >&2; exit 1; }
	@set -e; for name in $(IMAGES); do \
	  echo "make images: $(REGISTRY)/$$name:$(TAG) from containers/Dockerfile.$$name"; \
	  docker build -f containers/Dockerfile.$$name -t $(REGISTRY)/$$name:$(TAG) .; \
	  if [ "$(PUSH)" = 1 ]; then docker push $(REGISTRY)/$$name:$(TAG); fi; \
	done
