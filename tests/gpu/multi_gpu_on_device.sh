#!/usr/bin/env bash
# Issue 10: sparse training on 2 GPUs through NCCL (DDP and FSDP2, train.kernels=cuda and torch) against one GPU on
# the same global batch. A paper-shaped model (D 2048, H 5632, 32 heads, MG_LAYERS=4 layers, vocabulary 4096),
# 16 × 2048 tokens per step globally (8 sequences per GPU on 2 GPUs), MG_STEPS=40 steps, λ 3e-3 from step 0 (the
# FFNs run sparse from step ~20, tests/gpu/train_runs_on_device.sh). The runs go most important first and each
# comparison is written as soon as its pair exists, so a cut-short lease still returns what ran.
# Outputs in $OUT: <run>.log, runs/<run>/{metrics.jsonl,summary.json}, multi_gpu.json (compare_runs.py pairs).
# NVLink multicast stays off (the device machines' rule): NCCL_NVLS_ENABLE=0 and friends are exported here.
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
RUNS=/tmp/mg_runs; rm -rf "$RUNS"; mkdir -p "$RUNS"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SPARSIFY_CACHE=/tmp/spcache WANDB_MODE=disabled
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
failed=()
args=(--recipe paper_0.5b model.n_layers="${MG_LAYERS:-4}" data.vocab_size=4096 train.batch_size=16 train.grad_accum=1
      train.seq_len=2048 train.max_steps="${MG_STEPS:-40}" train.log_every=5 optim.lr=1e-3 optim.warmup_steps=10
      sparsity.l1_coeff=3e-3 sparsity.l1_warmup_steps=0 logger.wandb.mode=disabled train.seed=0 train.eval_every=0
      train.save_every=0 train.eval_batches=2)

one() {  # one NAME NPROC PARALLEL KERNELS
  local name=$1 t0=$SECONDS
  echo "== [t=${SECONDS}s] $name"
  timeout -k 10 170 python3 -m sparsify_cli.cli.app train --nproc "$2" --out "$RUNS/$name" "${args[@]}" \
    train.parallel="$3" train.kernels="$4" >"$OUT/$name.log" 2>&1 || failed+=("$name")
  tail -n 4 "$OUT/$name.log"
  mkdir -p "$OUT/runs/$name" && cp "$RUNS/$name"/{metrics.jsonl,summary.json} "$OUT/runs/$name/" 2>/dev/null
  rm -rf "$RUNS/$name/checkpoint"
  echo "== $name: $((SECONDS - t0))s"
}
pair() {  # pair NAME CANDIDATE REFERENCE
  [[ -f $OUT/runs/$2/metrics.jsonl && -f $OUT/runs/$3/metrics.jsonl ]] || return
  python3 tests/gpu/compare_runs.py --json "$OUT/multi_gpu.json" --name "$1" --skip-steps 10 --last-steps 20 \
    "$OUT/runs/$2" "$OUT/runs/$3" > "$OUT/compare_$1.log" 2>&1
  cat "$OUT/compare_$1.log"
}

one ddp_cuda 2 ddp cuda
one one_cuda 1 ddp cuda
pair ddp_vs_one_cuda ddp_cuda one_cuda
one ddp_torch 2 ddp torch
pair ddp_cuda_vs_torch ddp_cuda ddp_torch
one fsdp_cuda 2 fsdp cuda
pair fsdp_vs_one_cuda fsdp_cuda one_cuda
one fsdp_torch 2 fsdp torch
pair fsdp_cuda_vs_torch fsdp_cuda fsdp_torch
one one_torch 1 ddp torch
pair one_cuda_vs_torch one_cuda one_torch
echo "== done in ${SECONDS}s"
((${#failed[@]})) && { echo "FAILED: ${failed[*]}"; exit 1; }
echo "all runs passed"
