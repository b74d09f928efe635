# The two commands of the README, plus their building blocks.
#   make demo   set up .venv and run the main job (dcgrpo demo)
#   make test   set up .venv and .venv-verl and run the whole test suite
.PHONY: setup setup-verl demo test lint clean

setup:
	@bash scripts/setup.sh cpu

setup-verl:
	@bash scripts/setup.sh verl

demo: setup
	.venv/bin/dcgrpo demo $(ARGS)

test: setup setup-verl
	@bash scripts/test.sh

lint: setup
	.venv/bin/ruff check src tests

clean:
	rm -rf .venv .venv-verl outputs .pytest_cache .ruff_cache
