#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git, carried to the GPU machine) the Python 3.12 x86-64 wheels
# of the packages this project imports that the GPU image does not have, and of those it has in
# versions older than the pins (flax 0.12.10, orbax-checkpoint 0.12.4 there). Run where pip can reach
# a package index; add names (NAME==VERSION) as arguments to fetch more.
set -eu
cd "$(dirname "$0")/.."
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "jax-triton==0.3.1" "grain==0.2.18" "array-record==0.8.6" "portpicker" "tensorboardX==2.6.5" \
  "flax==0.12.12" "orbax-checkpoint==0.12.8" "$@"
du -sh .whl
ls .whl
