#!/usr/bin/env bash
# Run the GPU tests and the FFN benchmark on the device machine; logs and JSON go to $OUT (or ./gpu_out).
# Usage (repo root): bash tests/gpu/run_on_device.sh [tests|bench|all] [extra args for the bench]
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
what=${1:-all}; shift || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 30 || rc=1
fi
if [[ $what == bench || $what == all ]]; then
  python3 -m sparsify_cli.bench.ffn --out "$OUT/ffn_bench.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{' || rc=1
fi
exit $rc
