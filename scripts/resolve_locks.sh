#!/usr/bin/env bash
# Resolve each image's lock file (containers/<image>.lock) for the image's
# platform (Linux x86_64, CPython 3.12, the base image's glibc) without
# installing anything: uv reads package metadata from the index only.
#
#   scripts/resolve_locks.sh [IMAGE...]                    check (default): re-resolve with the lock's pins
#                                                          preferred; fail if it no longer resolves or differs
#   scripts/resolve_locks.sh --update [IMAGE...]           rewrite the locks (keeps pins that still fit)
#   scripts/resolve_locks.sh --update --upgrade [IMAGE...] bump every pin to the newest that fits
#
# IMAGE is light, gpu or verl (default: all). Prints how long each took; exits
# non-zero on the first failure. The inputs of a lock are pyproject.toml (base
# dependencies + the image's extras) and, for verl, containers/verl.in.
# Env: UV (a uv binary to use instead of the pinned one installed into .venv-tools),
# UV_DEFAULT_INDEX / UV_INDEX_URL (a mirror of PyPI).
set -euo pipefail

UV_VERSION=0.13.9   # pinned: another uv may resolve (or format) the same inputs differently
PYTHON_VERSION=3.12 # every image's Python (python:3.12 slim; Ubuntu 24.04's python3.12)

# image  -> "extras|extra inputs|platform". The platform is the base image's glibc, so
# no wheel needs a newer one than the image has:
#   light: python:3.12-slim-bookworm (glibc 2.36); gpu, verl: nvidia/cuda:*-ubuntu24.04 (glibc 2.39).
declare -A SPEC=(
  [light]="server||x86_64-manylinux_2_36"
  [gpu]="gpu||x86_64-manylinux_2_39"
  [verl]="verl|containers/verl.in|x86_64-manylinux_2_39"
)
ALL=(light gpu verl)

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

mode=check
upgrade=()
images=()
for arg in "$@"; do
  case "$arg" in
    --update) mode=update ;;
    --upgrade) upgrade=(--upgrade) ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "resolve_locks: unknown option $arg" >&2; exit 2 ;;
    *) [[ -n "${SPEC[$arg]:-}" ]] || { echo "resolve_locks: unknown image '$arg' (expected: ${ALL[*]})" >&2; exit 2; }
       images+=("$arg") ;;
  esac
done
[[ ${#images[@]} -gt 0 ]] || images=("${ALL[@]}")
if [[ $mode == check && ${#upgrade[@]} -gt 0 ]]; then
  echo "resolve_locks: --upgrade only makes sense with --update" >&2; exit 2
fi

# uv: the pinned version, installed once into .venv-tools (git-ignored) with plain pip.
uv=${UV:-}
if [[ -z "$uv" ]]; then
  uv=.venv-tools/bin/uv
  if [[ ! -x "$uv" || "$("$uv" --version 2>/dev/null)" != "uv $UV_VERSION"* ]]; then
    echo "resolve_locks: installing uv $UV_VERSION into .venv-tools"
    [[ -x .venv-tools/bin/python ]] || "${PYTHON:-python3}" -m venv .venv-tools
    .venv-tools/bin/python -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" 2>&1 \
      | { grep -v "is neither a file nor a directory" || true; }
  fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Requirement lines and hashes only: the header and "# via" comments may differ harmlessly.
content() { grep -v '^[[:space:]]*#' "$1" | sed '/^[[:space:]]*$/d'; }
pins() { grep -Eio '^(vllm|torch|transformers|verl)==[^ ]+' "$1" | paste -sd ' ' - | grep . || echo "no vllm/torch/transformers"; }

for image in "${images[@]}"; do
  IFS='|' read -r extras inputs platform <<<"${SPEC[$image]}"
  lock=containers/$image.lock
  out=$lock
  if [[ $mode == check ]]; then
    [[ -f $lock ]] || { echo "resolve_locks: $lock is missing (run $0 --update $image)" >&2; exit 1; }
    # Resolve into a copy: uv prefers the pins of an existing output file, so an
    # up-to-date lock resolves to itself.
    out=$tmp/$image.lock
    cp "$lock" "$out"
  fi
  # shellcheck disable=SC2086  # $inputs is empty or one path
  args=(pip compile pyproject.toml $inputs --extra "$extras"
        --python-version "$PYTHON_VERSION" --python-platform "$platform"
        --generate-hashes --quiet "${upgrade[@]}" -o "$out")
  start=$(date +%s.%N)
  if ! "$uv" "${args[@]}"; then
    echo "resolve_locks: $image FAILED to resolve for $platform, Python $PYTHON_VERSION" >&2
    exit 1
  fi
  took=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if [[ $mode == check ]] && ! diff -u <(content "$lock") <(content "$out") >"$tmp/$image.diff"; then
    head -40 "$tmp/$image.diff" >&2
    echo "resolve_locks: $lock is out of date with its inputs (resolved in $took s); run $0 --update $image" >&2
    exit 1
  fi
  echo "resolve_locks: $image $mode ok in $took s ($platform, Python $PYTHON_VERSION): $(pins "$out")"
done
