#!/usr/bin/env bash
# One host, one process per GPU (as on a multi-node cluster, on one machine): NUM_GPUS processes
# join through jax.distributed on 127.0.0.1:PORT, each seeing one GPU; process 0 writes the workdir.
# launch/single_gpu.sh (one process for all GPUs) is simpler; this layout tests multi-process runs.
#   NUM_GPUS=8 bash launch/multi_gpu.sh configs/sd15_object.py /scratch/gal/cat [--config.x=...]
# DRY_RUN=1 prints each process's command and runs nothing.
set -euo pipefail
quoted() { local s; s=$(printf '%q ' "$@"); printf '%s' "${s% }"; }  # one shell-safe line
if [ $# -lt 2 ]; then echo "usage: NUM_GPUS=N bash $0 CONFIG WORKDIR [--config.x=...]" >&2; exit 2; fi
CONFIG=$1; WORKDIR=$2; shift 2
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
PORT=${PORT:-12355}
if [ "$NUM_GPUS" -lt 1 ]; then echo "$0: no GPU found; set NUM_GPUS" >&2; exit 2; fi
pids=()
for ((i = 0; i < NUM_GPUS; i++)); do
  RUN=(env CUDA_VISIBLE_DEVICES="$i" gal-jax run --distributed --coordinator_address="127.0.0.1:$PORT"
       --num_processes="$NUM_GPUS" --process_id="$i" --config="$CONFIG" --workdir="$WORKDIR" "$@")
  if [ -n "${DRY_RUN:-}" ]; then
    printf 'process %d: %s\n' "$i" "$(quoted "${RUN[@]}")"
    continue
  fi
  "${RUN[@]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
