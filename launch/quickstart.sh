#!/usr/bin/env bash
# README command 1: install (./.venv) and run GAL on the embedded tiny world (trained tiny SD and
# CLIP shipped in gal_jax/assets/tiny_world; CPU, offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
.venv/bin/gal-jax run --config=configs/tiny_world.py --workdir="${WORKDIR:-workdirs/tiny_world}" "$@"
