#!/usr/bin/env bash
# Runs GAL on every host of a TPU pod slice (jax.distributed auto-detects the pod).
#   TPU=my-v5e-32 ZONE=us-west4-a bash launch/tpu_pod.sh configs/sd15_object.py gs://bucket/gal/cat [--config.x=...]
set -euo pipefail
CONFIG=$1; WORKDIR=$2; shift 2
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd ~/gal_jax && pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install -q -e '.[tpu,torch]' &&
  gal-jax run --distributed --config=$CONFIG --workdir=$WORKDIR $*"
