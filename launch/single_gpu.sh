#!/usr/bin/env bash
# One host, all its GPUs in one process (the mesh spans them). Needs `pip install -e .[cuda,torch]`.
#   bash launch/single_gpu.sh configs/sd15_object.py /scratch/gal/cat --config.model.sd_path=...
# The mesh is any --config.mesh.data/fsdp/tensor split of the GPUs, e.g. 8 GPUs as fsdp 4 x tensor 2:
#   ... --config.mesh.data=1 --config.mesh.fsdp=4 --config.mesh.tensor=2   (README: the device mesh)
# DRY_RUN=1 prints the command and runs nothing.
set -euo pipefail
quoted() { local s; s=$(printf '%q ' "$@"); printf '%s' "${s% }"; }  # one shell-safe line
if [ $# -lt 2 ]; then echo "usage: bash $0 CONFIG WORKDIR [--config.x=...]" >&2; exit 2; fi
CONFIG=$1; WORKDIR=$2; shift 2
RUN=(env XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
     gal-jax run --config="$CONFIG" --workdir="$WORKDIR" "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf 'run: %s\n' "$(quoted "${RUN[@]}")"
  exit 0
fi
"${RUN[@]}"
