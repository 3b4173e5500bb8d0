"""The fused decode path at 99.5% sparsity, D=2048, H=5632, with and without programmatic dependent launch of
its down kernel (development tool). Each variant is timed as a CUDA-graph replay over 8 layers, whole path and
gate kernel alone, in two interleaved rounds (median of 100 replays each), beside dense and the gate GEMM. The
variants measured while choosing (PDL for both kernels, the down kernel launched after the gate sweep, an L2
prefetch of the gate rows, other load depths and chunk orders) are in bench_results/session5 and BENCHMARKS.md.

    python3 tests/gpu/decode_tune.py OUT.json [M ...]
"""

from __future__ import annotations

import json
import sys

import torch

from sparsify_cli.bench.ffn import cuda_time, decode_layers, dense_block, graph_replay
from sparsify_cli.kernels import launchers


def variants(m: int) -> dict[str, bool]:
    """name -> the down kernel launched with programmatic dependent launch."""
    return {"plain": False, "pdl": True}


def main() -> None:
    out = sys.argv[1]
    ms = [int(v) for v in sys.argv[2:]] or [1, 2, 4, 8]
    layers, reps = 8, 100
    result = []
    for m in ms:
        sets, downs_t = decode_layers(m, layers, 300)
        x = sets[0].x
        o = torch.empty_like(x)
        row = {"M": m, "dense_ms": [], "gate_gemm_ms": [], "full_ms": {}, "gate_up_ms": {}}
        vs = variants(m)
        replays = {}
        for name, pdl in vs.items():
            replays[name] = (
                graph_replay(lambda: [launchers.launch_decode_ffn(x, s.gate, s.up, dt, o, pdl=pdl)
                                      for s, dt in zip(sets, downs_t)]),
                graph_replay(lambda: [launchers.launch_decode_gate_up(x, s.gate, s.up) for s in sets]))
        dense = graph_replay(lambda: [dense_block(x, s.gate, s.up, s.down) for s in sets])
        gemm = graph_replay(lambda: [x @ s.gate.T for s in sets])
        for _ in range(2):
            row["dense_ms"].append(cuda_time(dense, reps) / layers)
            row["gate_gemm_ms"].append(cuda_time(gemm, reps) / layers)
            for name, (full, gate_up) in replays.items():
                row["full_ms"].setdefault(name, []).append(cuda_time(full, reps) / layers)
                row["gate_up_ms"].setdefault(name, []).append(cuda_time(gate_up, reps) / layers)
        us = lambda v: "/".join(f"{t * 1e3:.1f}" for t in v)  # noqa: E731
        print(f"M={m}: dense {us(row['dense_ms'])} us, gate GEMM {us(row['gate_gemm_ms'])} us", flush=True)
        for name in vs:
            print(f"  {name:22s} full {us(row['full_ms'][name])} us, gate-up {us(row['gate_up_ms'][name])} us",
                  flush=True)
        result.append(row)
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": result}, f, indent=1)


if __name__ == "__main__":
    main()
