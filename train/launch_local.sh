#!/usr/bin/env bash
# Multi-process training on this one machine, on CPU: N processes with K fake devices each, joined
# by jax.distributed and gloo collectives, exactly as N hosts would be. Anyone can run it to see
# multi-host training (and expert parallelism across processes) work.
#
#   bash train/launch_local.sh 2 4 --config tiny --set moe.n_routed_experts=16 --set mesh.expert=4 \
#       --set train.steps=20 --workdir runs/multi
#
# Arguments: NUM_PROCESSES DEVICES_PER_PROCESS, then everything `dsmoe-jax train` takes. If one
# process fails, the others are stopped too; restart with --resume to continue.
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS [dsmoe-jax train arguments...]" >&2
    exit 2
fi
n=$1 devices=$2
shift 2
port=${DSMOE_PORT:-$((20000 + RANDOM % 20000))}
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for ((i = 0; i < n; i++)); do
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
        dsmoe-jax train "$@" --coordinator "127.0.0.1:$port" --num-processes "$n" --process-id "$i" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=$?
done
exit "$status"
