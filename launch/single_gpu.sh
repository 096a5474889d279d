#!/usr/bin/env bash
# One host, all its GPUs in one process (the mesh spans them). Needs `pip install -e .[cuda,torch]`.
#   bash launch/single_gpu.sh configs/sd15_object.py /scratch/gal/cat --config.model.sd_path=...
set -euo pipefail
CONFIG=$1; WORKDIR=$2; shift 2
XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95} \
  gal-jax run --config="$CONFIG" --workdir="$WORKDIR" "$@"
