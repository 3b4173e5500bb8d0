"""Decode's gate GEMM at 1..64 tokens: torch's cuBLAS call against cuBLASLt's other algorithms (development tool).

Why: above 16 tokens decode runs cuBLAS's gate GEMM (~half the sparse path's time) and then two kernels; 2x dense at
17..64 tokens needs ~2-2.5 us less (BENCHMARKS.md). cuBLAS picks one algorithm per shape; cuBLASLt's heuristic
offers several (split-K among them), and at these skinny shapes (M <= 64, K 2048, N 3968 or 5632: a 16-23 MB
weight read) a different one may stream the weight faster. Each variant is timed as in the FFN suite's decode
rows: a CUDA graph over LAYERS layers with their own weights (so the weights come from HBM, as in a model),
median replay time per layer; variants interleaved over ROUNDS rounds, best round kept. Also: torch with
preferred_blas_library("cublaslt"), and each variant's max relative difference from torch's output.

    python3 tests/gpu/gate_gemm_tune.py OUT.json     # GATE_TUNE_M=1,16,17,32,64 GATE_TUNE_H=3968,5632
"""

from __future__ import annotations

import json
import os
import sys

import torch

from sparsify_cli.bench.ffn import D_MODEL, cuda_time, environment, graph_replay

LAYERS = 8
ROUNDS = int(os.environ.get("GATE_TUNE_ROUNDS", "3"))
MS = [int(v) for v in os.environ.get("GATE_TUNE_M", "1,8,16,17,24,32,48,64").split(",")]
HS = [int(v) for v in os.environ.get("GATE_TUNE_H", "3968,5632").split(",")]


def row(m: int, h: int) -> dict:
    from lt_relu_gemm import LtReluGemm

    gen = torch.Generator(device="cuda").manual_seed(m * 31 + h)
    x = torch.randn(m, D_MODEL, generator=gen, device="cuda").to(torch.bfloat16)
    ws = [(torch.randn(h, D_MODEL, generator=gen, device="cuda") * 0.02).to(torch.bfloat16) for _ in range(LAYERS)]
    outs = [torch.empty(m, h, dtype=torch.bfloat16, device="cuda") for _ in range(LAYERS)]
    ref = x @ ws[0].T

    def torch_mm():
        for w, o in zip(ws, outs):
            torch.mm(x, w.T, out=o)

    replays = {"torch": graph_replay(torch_mm)}
    prev = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library("cublaslt")
        replays["torch_cublaslt"] = graph_replay(torch_mm)
    finally:
        torch.backends.cuda.preferred_blas_library(prev)
    diffs = {}
    n_algos = LtReluGemm(m, D_MODEL, h, relu_aux=False).algorithms
    for i in range(n_algos):
        lt = LtReluGemm(m, D_MODEL, h, algo=i, relu_aux=False)

        def lt_mm(lt=lt):
            for w, o in zip(ws, outs):
                lt(x, w, o, None)

        lt_mm()
        torch.cuda.synchronize()
        diffs[f"lt{i}"] = ((outs[0].float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        replays[f"lt{i}"] = graph_replay(lt_mm)
        diffs[f"lt{i}_workspace"] = int(lt.result.workspace_size)
    rounds: dict[str, list[float]] = {k: [] for k in replays}
    for _ in range(ROUNDS):
        for k, fn in replays.items():
            rounds[k].append(cuda_time(fn, 30) * 1000 / LAYERS)
    us = {k: min(v) for k, v in rounds.items()}
    best = min(us, key=us.get)
    return {"M": m, "H": h, "D": D_MODEL, "algorithms": n_algos, "us_per_layer": us, "best": best,
            "best_gain_us": us["torch"] - us[best], "checks": diffs, "us_rounds": rounds}


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lt_relu_gemm beside this file
    result = {"environment": environment(), "layers": LAYERS, "rounds": ROUNDS, "rows": []}
    for h in HS:
        for m in MS:
            r = row(m, h)
            result["rows"].append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "us_rounds"}), flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
