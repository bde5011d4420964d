#!/usr/bin/env bash
# Runs dlrm_jax as N processes on this machine, each with its own CPU devices,
# joined by jax.distributed over 127.0.0.1 (CPU collectives use gloo). For
# testing multi-host code paths without a cluster.
#
# Usage:
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local.sh \
#       --config=configs/criteo.py:tiny --workdir=/tmp/run
#
# Environment:
#   NUM_PROCESSES        processes to start (default 2)
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2)
#   PORT                 coordinator port on 127.0.0.1 (default: a free one)
#   PYTHON               interpreter (default: python)
# Every argument is passed to `python -m dlrm_jax.main`. Each process writes
# its output to stderr with a `[process i]` prefix. The script exits with the
# first non-zero exit status, after stopping the other processes.
set -euo pipefail

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
PYTHON=${PYTHON:-python}
if [ -z "${PORT:-}" ]; then
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for ((i = 0; i < NUM_PROCESSES; i++)); do
  (
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
    export DLRM_COORDINATOR_ADDRESS="127.0.0.1:${PORT}"
    export DLRM_NUM_PROCESSES="${NUM_PROCESSES}"
    export DLRM_PROCESS_ID="${i}"
    exec "$PYTHON" -m dlrm_jax.main "$@" 2> >(sed -u "s/^/[process ${i}] /" >&2)
  ) &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  if ! wait "$pid"; then
    status=$?
    [ "$status" -ne 0 ] || status=1
    cleanup
  fi
done
trap - EXIT
exit "$status"
