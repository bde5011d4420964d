#!/usr/bin/env bash
# dlrm_jax on a Cloud TPU VM (a single host or a pod slice): copies this
# checkout to every worker, installs it with JAX for TPU, and starts one
# process per worker.
#
# Usage (from the repository root, with gcloud logged in):
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a launch/tpu_vm.sh \
#       --config=configs/criteo.py:terabyte \
#       --config.data.train_path='/mnt/criteo/day_{0..22}'
#
# What it sets: DLRM_DISTRIBUTED=1, so dlrm_jax calls
# jax.distributed.initialize() and JAX finds the workers from the TPU
# metadata. The workdir (WORKDIR, default /mnt/runs/dlrm) and the data must be
# on storage every worker sees (a persistent disk in read-only mode, Filestore
# or GCS through gcsfuse).
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM (required)
#   PROJECT          gcloud project (optional)
#   WORKDIR          run directory on shared storage
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
WORKDIR=${WORKDIR:-/mnt/runs/dlrm}
gcloud_args=(--zone="${ZONE}")
if [ -n "${PROJECT:-}" ]; then gcloud_args+=(--project="${PROJECT}"); fi

args=$(printf ' %q' "$@")
git archive --format=tar.gz -o /tmp/dlrm_jax.tar.gz HEAD
gcloud compute tpus tpu-vm scp /tmp/dlrm_jax.tar.gz "${TPU_NAME}:~/" \
    --worker=all "${gcloud_args[@]}"
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --worker=all "${gcloud_args[@]}" \
    --command="set -e
mkdir -p ~/dlrm_jax && tar -xzf ~/dlrm_jax.tar.gz -C ~/dlrm_jax
cd ~/dlrm_jax
python3 -m venv .venv && . .venv/bin/activate
pip install -q -e . 'jax[tpu]'
DLRM_DISTRIBUTED=1 python -m dlrm_jax.main --workdir=${WORKDIR}${args}"
