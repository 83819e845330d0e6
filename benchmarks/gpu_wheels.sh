#!/usr/bin/env bash
# The wheels benchmarks/gpu_suite.sh needs on a GPU node that has torch, triton and transformers but no
# megatron-core and no network: run this on a machine with network, then bring .wheels/ (git ignores it)
# along.  Only what such a node lacks, for CPython 3.12 on x86-64 Linux; under 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .wheels \
  "megatron-core==0.19.2" "${@}"
du -sh .wheels
ls .wheels
