#!/usr/bin/env bash
# Runs GAL on every host of a TPU pod slice (jax.distributed auto-detects the pod). Every worker
# runs the same command; process 0 writes the workdir, which must be on storage all hosts share.
#   TPU=my-v5e-32 ZONE=us-west4-a bash launch/tpu_pod.sh configs/sd15_object.py /mnt/shared/gal/cat [--config.x=...]
# DRY_RUN=1 prints the gcloud command and the command each worker runs, and runs nothing.
set -euo pipefail
quoted() { local s; s=$(printf '%q ' "$@"); printf '%s' "${s% }"; }  # one shell-safe line
if [ $# -lt 2 ]; then echo "usage: TPU=NAME ZONE=ZONE bash $0 CONFIG WORKDIR [--config.x=...]" >&2; exit 2; fi
: "${TPU:?set TPU to the pod slice name}" "${ZONE:?set ZONE to its zone}"
CONFIG=$1; WORKDIR=$2; shift 2
# Quoted once here, so arguments with spaces reach every worker intact.
RUN=$(quoted gal-jax run --distributed --config="$CONFIG" --workdir="$WORKDIR" "$@")
WORKER_COMMAND="cd ~/gal_jax && pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install -q -e '.[tpu,torch]' && $RUN"
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$WORKER_COMMAND")
if [ -n "${DRY_RUN:-}" ]; then
  printf 'launch: %s\n' "$(quoted "${GCLOUD[@]}")"
  printf 'every worker: %s\n' "$WORKER_COMMAND"
  exit 0
fi
"${GCLOUD[@]}"
