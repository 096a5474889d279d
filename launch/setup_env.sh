#!/usr/bin/env bash
# Creates ./.venv and installs gal_jax with its pinned stack (CPU). Idempotent; about a minute.
# torch goes first: the CPU wheel 2.13.0 is small, while letting a dependency pull `torch` fetches GBs
# of CUDA libraries (STACK.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# setuptools warns on every editable install that a folder named like the package may shadow it
# (it is the package); pip warns about index locations this machine's config names but lacks.
export PYTHONWARNINGS="ignore:Editable installation"
pip_install() {
  .venv/bin/python -m pip install -q "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2)
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install --upgrade pip
pip_install -c launch/constraints.txt "torch==2.13.0"
# The package and the test extra (pytest, the PyTorch references), at the tested pins.
pip_install -c launch/constraints.txt -e ".[cpu,test]"
