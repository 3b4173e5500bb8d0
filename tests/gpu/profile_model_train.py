"""Where a whole training step spends its GPU time, dense FFNs vs the sparse training op (development tool).

    python3 tests/gpu/profile_model_train.py [--out DIR] [key=value ...]   (the model suite's settings, e.g. layers=8)
Builds the model suite's synthetic paper-shaped model, runs one step of each copy under torch.profiler and writes
model_train_profile.json: GPU time per kernel name (top 25), the sum of all kernels and the step's wall time, so the
FFN's share of a step and the host gaps can be read off.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sparsify_cli.bench import settings as bench_settings
from sparsify_cli.bench.measure import kernel_ms
from sparsify_cli.bench.model import ModelSuite
from sparsify_cli.bench.model_pair import measure_nnz
from sparsify_cli.bench.train_ffn import ell_width


def profile_step(run) -> dict:
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        run()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / 5 * 1000
    per = kernel_ms(run)
    return {"wall_ms": wall, "kernels_ms": sum(per.values()), "top": dict(list(per.items())[:25])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    s = bench_settings.resolve("model", "cuda", list(args.overrides))
    suite = ModelSuite(s, None, torch.device("cuda"))
    m = suite._ensure()
    x = suite._tokens(s.train_batch, s.seq_len, 3)
    widths = [s.width or ell_width(n) for n in measure_nnz(m.dense, x)[1]]
    result = {"gpu": torch.cuda.get_device_name(), "settings": {k: str(v) for k, v in vars(s).items()}}
    for name, sparse in (("dense", None), ("sparse", True)):
        copy = suite._train_copy(sparse, widths, "cuda")
        result[name] = profile_step(copy.step(x))
        del copy
        torch.cuda.empty_cache()
        r = result[name]
        print(f"{name}: wall {r['wall_ms']:.1f} ms, kernels {r['kernels_ms']:.1f} ms")
        for k, v in r["top"].items():
            print(f"   {v:8.2f} ms  {k}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "model_train_profile.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
