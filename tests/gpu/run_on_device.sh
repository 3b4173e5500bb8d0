#!/usr/bin/env bash
# Run the GPU tests and the FFN benchmark on the device machine; logs and JSON go to $OUT (or ./gpu_out).
# Usage (repo root): bash tests/gpu/run_on_device.sh [tests|bench|profile|train|tune|glue|hot|order|host|decode|all] [extra args for the bench]
# train: the training op's GPU tests and its fwd+bwd profile (tests/gpu/profile_train.py) only
# tune: the prefill kernel's builds (cache hints, activation-row prefetch): their GPU tests, then
#       tests/gpu/prefill_tune.py's prefill rows (every neuron and packed layers, each build) into $OUT/prefill_tune.json
# glue: the hybrid's hot relu(a) * u in one kernel (ops.relu_mul): its GPU tests, then the prefill rows with it and
#       with torch's two passes (PREFILL_TUNE_GLUES=fused,torch, 4 rounds) into $OUT/glue_tune.json
# hot: the hybrid's dense/sparse split (n_hot) swept on packed layers (tests/gpu/hot_tune.py) into $OUT/hot_tune.json
# order: the cold lists' GPU tests, then the hybrid's order of work (tests/gpu/hybrid_order.py) on packed layers and
#        on every neuron into $OUT/hybrid_order_packed.json and $OUT/hybrid_order_full.json, then Nsight Compute on
#        the list pass and the cold kernel's builds (tests/gpu/profile_cold.py) into $OUT/ncu_cold.txt
# host: the eager routing test, then the sparse block's host cost and the eager dense/sparse crossover
#       (tests/gpu/host_cost.py at 1024...4096 tokens) into $OUT/host_cost.json (SparsePolicy.eager_prefill_dense_max_work)
# decode: the decode, fused and gemv GPU tests, then the path above 16 tokens part by part with the up-dot kernel's
#         builds (tests/gpu/decode_breakdown.py at 17, 32, 64 tokens) into $OUT/decode_breakdown.json, then Nsight
#         Compute on its two kernels at 64 tokens (tests/gpu/profile_decode.py) into $OUT/ncu_decode.txt
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: some steps run from tests/gpu
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
what=${1:-all}; shift || true
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
rc=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 30 || rc=1
fi
if [[ $what == train ]]; then
  python3 -m pytest -q tests/gpu/test_train_kernels.py -p no:cacheprovider 2>&1 | tee "$OUT/train_tests.log" | tail -n 40 || rc=1
  python3 tests/gpu/profile_train.py --out "$OUT" "$@" 2>&1 | tee "$OUT/train_profile.log" || rc=1
fi
if [[ $what == tune ]]; then
  python3 -m pytest -q tests/gpu/test_twell_kernels.py -k "cache_hint or hybrid" -p no:cacheprovider 2>&1 \
    | tee "$OUT/tune_tests.log" | tail -n 5 || rc=1
  python3 tests/gpu/prefill_tune.py "$OUT/prefill_tune.json" prefill 2>&1 | tee "$OUT/prefill_tune.log" || rc=1
fi
if [[ $what == glue ]]; then
  python3 -m pytest -q tests/gpu/test_twell_kernels.py -k "relu_mul or hybrid" -p no:cacheprovider 2>&1 \
    | tee "$OUT/glue_tests.log" | tail -n 5 || rc=1
  PREFILL_TUNE_BUILDS=hints1_prefetch PREFILL_TUNE_GLUES=fused,torch PREFILL_TUNE_ROUNDS=4 \
    python3 tests/gpu/prefill_tune.py "$OUT/glue_tune.json" prefill 2>&1 | tee "$OUT/glue_tune.log" || rc=1
fi
if [[ $what == hot ]]; then
  python3 tests/gpu/hot_tune.py "$OUT/hot_tune.json" 2>&1 | tee "$OUT/hot_tune.log" || rc=1
fi
if [[ $what == order ]]; then
  python3 -m pytest -q tests/gpu/test_twell_kernels.py -p no:cacheprovider \
    -k "relu_list or from_lists or hybrid or cold_kernel_builds" 2>&1 | tee "$OUT/order_tests.log" | tail -n 5 || rc=1
  python3 tests/gpu/hybrid_order.py "$OUT/hybrid_order_packed.json" 2>&1 | tee "$OUT/hybrid_order_packed.log" || rc=1
  HYBRID_ORDER_LAYER=full python3 tests/gpu/hybrid_order.py "$OUT/hybrid_order_full.json" 2>&1 \
    | tee "$OUT/hybrid_order_full.log" || rc=1
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [[ -n $NCU ]]; then  # the list pass and the cold kernel reading lists (one launch per build), two M
    timeout 300 "$NCU" --kernel-name regex:'twell_ffn_kernel|relu_list_kernel' \
      --metrics gpu__time_duration.sum,l1tex__t_sector_hit_rate.pct,lts__t_bytes.sum,lts__t_bytes.sum.per_second,lts__t_sector_hit_rate.pct,dram__bytes.sum.per_second,sm__warps_active.avg.pct_of_peak_sustained_active,lts__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread \
      python3 tests/gpu/profile_cold.py > "$OUT/ncu_cold.txt" 2>&1; grep -v "^==PROF==" "$OUT/ncu_cold.txt" | tail -n 60
  fi
fi
if [[ $what == host ]]; then
  python3 -m pytest -q tests/gpu/test_twell_kernels.py -k "eager_decode" -p no:cacheprovider 2>&1 \
    | tee "$OUT/host_tests.log" | tail -n 5 || rc=1
  HOST_SHAPES=${HOST_SHAPES:-1024x29,1536x29,2048x29,3072x29,4096x29} python3 tests/gpu/host_cost.py \
    "$OUT/host_cost.json" 2>&1 | tee "$OUT/host_cost.log" | cut -c1-400 || rc=1
fi
if [[ $what == decode ]]; then
  python3 -m pytest -q tests/gpu -k "fused or decode or gemv or eager_decode" -p no:cacheprovider 2>&1 \
    | tee "$OUT/decode_tests.log" | tail -n 5 || rc=1
  python3 tests/gpu/decode_breakdown.py "$OUT/decode_breakdown.json" 17 32 64 2>&1 | tee "$OUT/decode_breakdown.log" \
    || rc=1
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [[ -n $NCU ]]; then  # profile_decode.py launches each kernel twice: skip the first pair
    timeout 200 "$NCU" --kernel-name regex:'decode_' --launch-skip 2 --launch-count 2 --section SpeedOfLight \
      --section WarpStateStats --section LaunchStats --section Occupancy --section SchedulerStats \
      --section MemoryWorkloadAnalysis python3 tests/gpu/profile_decode.py 64 > "$OUT/ncu_decode.txt" 2>&1
    grep -E "decode_|Duration|Warp Cycles Per Issued|Achieved Active|Eligible Warps" "$OUT/ncu_decode.txt"
  fi
fi
if [[ $what == bench || $what == all ]]; then
  python3 -m sparsify_cli.bench.ffn --out "$OUT/ffn_bench.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v '^{' || rc=1
fi
if [[ $what == profile || $what == all ]]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  if [[ -n $NCU ]]; then
    timeout 240 "$NCU" --kernel-name regex:'twell_ffn_kernel|twell_pack|twell_up' --launch-skip 0 --launch-count 4 \
      --metrics gpu__time_duration.sum,lts__t_sector_hit_rate.pct,lts__t_bytes.sum.per_second,dram__bytes.sum.per_second,l1tex__t_sector_hit_rate.pct,sm__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active \
      python3 tests/gpu/profile_ffn.py > "$OUT/ncu.txt" 2>&1; tail -n 60 "$OUT/ncu.txt"
    timeout 120 "$NCU" --kernel-name regex:'twell_decode' --launch-skip 1 --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
      python3 tests/gpu/profile_ffn.py > "$OUT/ncu_decode.txt" 2>&1; grep -v "^==PROF==" "$OUT/ncu_decode.txt" | tail -n 70
  else
    echo "ncu not found" | tee "$OUT/ncu.txt"
  fi
fi
exit $rc
