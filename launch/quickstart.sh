#!/usr/bin/env bash
# README command 1: install (./.venv) and run GAL on the embedded tiny default (CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
.venv/bin/gal-jax run --config=configs/tiny_cpu.py --workdir="${WORKDIR:-workdirs/tiny}" "$@"
