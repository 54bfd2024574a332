#!/usr/bin/env bash
# One host with several GPUs: a single process drives every GPU it sees; the mesh comes from the
# config's [mesh] section (e.g. mesh.expert=8 spreads the routed experts over 8 GPUs, the rest of
# the devices split the batch). Choose the GPUs with CUDA_VISIBLE_DEVICES.
#
#   bash train/launch_gpus.sh --config configs/2b.toml --set mesh.expert=8 --workdir runs/2b
set -euo pipefail
# Let XLA take most of each GPU up front instead of growing allocations step by step.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec dsmoe-jax train "$@"
