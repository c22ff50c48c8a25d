#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .gpu-payload/ (bench/gpu/prepare.sh) beside it:
#     bash bench/gpu/run.sh OUT_DIR [extra bench_gpu.py options]
# Installs the carried polars wheels into /tmp/site (nothing else is installed), then runs the benchmark.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-${OUT:-bench-gpu-out}}
shift || true
PAYLOAD=${PAYLOAD:-.gpu-payload}
if ! python3 -c "import polars" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$PAYLOAD"/wheels/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 IGDREC_NO_PROGRESS=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python3 bench/gpu/bench_gpu.py --payload "$PAYLOAD" --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
