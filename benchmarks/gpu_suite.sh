#!/usr/bin/env bash
# One prepared GPU check (benchmarks/gpu_suite.py): every figure only a GPU can give, in under 10 minutes.
#   bash benchmarks/gpu_suite.sh [--out DIR] [--bundle FILE.tar.gz] [--stages ...] [--dry-run] [--layers N]
# On a GPU node without megatron-core or network: fetch the wheels first, on a machine with network
# (bash benchmarks/gpu_wheels.sh), and bring the .wheels folder along; they are installed into a scratch
# folder on PYTHONPATH, never into the node's Python.  --dry-run: the same stages at toy sizes on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export TIDAR_SITE=${TIDAR_SITE:-/tmp/tidar-site} TIDAR_WHEELS_INSTALLED=0
mkdir -p "$TIDAR_SITE"
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
  if ! ls .wheels/*.whl >/dev/null 2>&1; then
    echo "megatron-core is not importable and .wheels/ is empty: run 'bash benchmarks/gpu_wheels.sh' on a machine with network and bring .wheels/ along" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TIDAR_SITE" .wheels/*.whl
  TIDAR_WHEELS_INSTALLED=1
  echo "installed into $TIDAR_SITE: $(cd .wheels && ls *.whl | tr '\n' ' ')"
fi
# The repository itself without installing it: tidar_megatron from here, the kernels under their package name.
ln -sfn "$PWD/kernels" "$TIDAR_SITE/tidar_kernels"
export PYTHONPATH="$PWD:$TIDAR_SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_suite.py "$@"
