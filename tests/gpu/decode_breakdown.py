"""Where the decode path from the activation (above 16 tokens, or without a known density) spends its time, at
99.5% sparsity, D=2048, H=5632 (development tool). Each part is timed alone as a CUDA-graph replay over 8 layers
(median of 100 replays): dense, the cuBLAS gate GEMM, the up-dot kernel (decode_up_act_kernel) on precomputed
activations, the down kernel on precomputed h, the two together (PDL as the default launch), the whole path, and
the two kernels on an all-negative activation (no active pair: their fixed cost).

    python3 tests/gpu/decode_breakdown.py OUT.json [M ...]
"""

from __future__ import annotations

import json
import sys

import torch

from sparsify_cli.bench.ffn import HIDDEN, cuda_time, decode_layers, dense_block, graph_replay
from sparsify_cli.kernels import launchers


def main() -> None:
    out = sys.argv[1]
    ms = [int(v) for v in sys.argv[2:]] or [1, 17, 32, 64]
    layers, reps = 8, 100
    rows = []
    for m in ms:
        sets, downs_t = decode_layers(m, layers, 500)
        x = sets[0].x
        acts = [x @ s.gate.T for s in sets]
        dead = [-a.abs() - 1 for a in acts]  # no neuron active
        hbufs = [launchers.launch_decode_up_act(x, a, s.up) for a, s in zip(acts, sets)]
        o = torch.empty_like(x)

        def pair(act_list):
            return lambda: [launchers.launch_relu_ffn(x, a, s.up, dt, o, path="decode")
                            for a, s, dt in zip(act_list, sets, downs_t)]

        parts = {
            "dense": lambda: [dense_block(x, s.gate, s.up, s.down) for s in sets],
            "gate_gemm": lambda: [x @ s.gate.T for s in sets],
            "up_act_kernel": lambda: [launchers.launch_decode_up_act(x, a, s.up) for a, s in zip(acts, sets)],
            "down_kernel": lambda: [launchers.launch_decode_down(hb, dt, o, HIDDEN) for hb, dt in zip(hbufs, downs_t)],
            "both_kernels": pair(acts),
            "both_kernels_no_active": pair(dead),
            "whole_path": lambda: [launchers.launch_relu_ffn(x, x @ s.gate.T, s.up, dt, o, path="decode")
                                   for s, dt in zip(sets, downs_t)],
        }
        replays = {name: graph_replay(fn) for name, fn in parts.items()}
        row = {"M": m, "us": {name: cuda_time(r, reps) / layers * 1e3 for name, r in replays.items()}}
        print(f"M={m}: " + ", ".join(f"{k} {v:.1f}" for k, v in row["us"].items()) + " (us per layer)", flush=True)
        rows.append(row)
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
