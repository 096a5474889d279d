#!/usr/bin/env bash
# Creates ./.venv and installs gal_jax with its pinned stack (CPU). Idempotent; about a minute.
# torch goes first: the CPU wheel 2.13.0 is small, while letting a dependency pull `torch` fetches GBs
# of CUDA libraries (STACK.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[cpu,torch,test]"
