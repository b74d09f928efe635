#!/usr/bin/env bash
# The test suite, as `make test` and CI run it (after scripts/setup.sh).
#  1. ruff over the code;
#  2. pytest in .venv (vLLM CPU, MLflow, kfp, moto): everything not marked verl;
#  3. pytest in .venv-verl: the tests marked verl (equivalence with verl's own
#     functions, the plugin), with DCGRPO_REQUIRE_VERL=1 so they cannot skip.
# Extra arguments go to both pytest runs (e.g. -x, -k name).
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

run_pytest() {  # pytest exits 5 when it collects nothing: that is a failure here too
  "$@"
  local rc=$?
  if [[ $rc -eq 5 ]]; then echo "test.sh: no tests collected by: $*" >&2; fi
  return $rc
}

status=0
echo "== ruff"
.venv/bin/ruff check src tests components pipelines benchmarks || status=1
.venv/bin/ruff format --check src tests components pipelines benchmarks || status=1
echo "== pytest (.venv: vLLM CPU, MLflow, kfp, S3)"
run_pytest .venv/bin/python -m pytest -m "not verl" --ignore=tests/verl "$@" || status=1
echo "== pytest (.venv-verl: verl equivalence and plugin)"
DCGRPO_REQUIRE_VERL=1 run_pytest .venv-verl/bin/python -m pytest -m verl tests/verl "$@" || status=1
exit $status
