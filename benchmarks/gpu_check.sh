#!/usr/bin/env bash
# The GPU check in one run (about 10 minutes): install what the GPU image lacks, then every step of
# benchmarks/gpu_check.py; results in $OUT/gpu_check.json and $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_wheels.sh           # here, beforehand: the wheels the image lacks, into .whl/
#   bash benchmarks/gpu_check.sh            # on the GPU machine, with .whl/ carried along
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere: the same steps at toy sizes, no installing
#
# The image already has jax with its CUDA plugin: everything is installed with --no-deps, because
# letting pip resolve dependencies would put a CPU jax beside the plugin, which then disables
# itself and everything silently runs on the CPU (the check refuses to go on if that happens).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ "${1:-}" != "--dry-run" ]; then
  if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "gpu_check: no wheels in .whl/: run 'bash benchmarks/gpu_wheels.sh' where pip can download" >&2
    exit 2
  fi
  site=/tmp/dsmoe_jax_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 2
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-cache-dir -e . || exit 2
fi
export PYTHONUNBUFFERED=1
"$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
