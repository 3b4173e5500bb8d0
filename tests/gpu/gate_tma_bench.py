"""The bulk-copy gate kernel (kernels_cu/decode_gate_tma.cu) against cuBLAS's gate GEMM, alone and as the first
step of the decode path, at 99.5% sparsity, D=2048, H=5632 (development tool). CUDA-graph replays over 8 layers
(median of 100): dense; the gate projection by cuBLAS and by the kernel (plain, and PDL-launched); the decode
path from the activation with either gate; the fused path where it runs (M <= 16).

    python3 tests/gpu/gate_tma_bench.py OUT.json [M ...]
"""

from __future__ import annotations

import json
import sys

import torch

from sparsify_cli.bench.ffn import HIDDEN, cuda_time, decode_layers, dense_block, graph_replay
from sparsify_cli.kernels import launchers


def main() -> None:
    out = sys.argv[1]
    ms = [int(v) for v in sys.argv[2:]] or [1, 8, 16, 17, 32, 64]
    layers, reps = 8, 100
    rows = []
    for m in ms:
        sets, downs_t = decode_layers(m, layers, 500)
        x = sets[0].x
        acts = [torch.empty(m, HIDDEN, dtype=torch.bfloat16, device=x.device) for _ in sets]
        o = torch.empty_like(x)
        ref = [x @ s.gate.T for s in sets]
        for a, s in zip(acts, sets):
            launchers.launch_gate_tma(x, s.gate, a)
        err = max(((a.float() - r.float()).abs().max() / r.float().abs().max()).item() for a, r in zip(acts, ref))

        def tma_path(pdl):
            def run():
                for a, s, dt in zip(acts, sets, downs_t):
                    launchers.launch_gate_tma(x, s.gate, a, pdl=pdl)
                    launchers.launch_relu_ffn(x, a, s.up, dt, o, path="decode")
            return run

        parts = {
            "dense": lambda: [dense_block(x, s.gate, s.up, s.down) for s in sets],
            "gate_cublas": lambda: [x @ s.gate.T for s in sets],
            "gate_tma": lambda: [launchers.launch_gate_tma(x, s.gate, a) for a, s in zip(acts, sets)],


            "gate_tma_pdl": lambda: [launchers.launch_gate_tma(x, s.gate, a, pdl=True) for a, s in zip(acts, sets)],
            "path_cublas": lambda: [launchers.launch_relu_ffn(x, x @ s.gate.T, s.up, dt, o, path="decode")
                                    for s, dt in zip(sets, downs_t)],
            "path_tma": tma_path(False),
            "path_tma_pdl": tma_path(True),
        }
        if m <= launchers.FUSED_MAX_M:
            parts["path_fused"] = lambda: [launchers.launch_decode_ffn(x, s.gate, s.up, dt, o)
                                           for s, dt in zip(sets, downs_t)]
        replays = {name: graph_replay(fn) for name, fn in parts.items()}
        us = {name: cuda_time(r, reps) / layers * 1e3 for name, r in replays.items()}
        row = {"M": m, "us": us, "max_rel_err_vs_cublas": err,
               "speedup": {k: us["dense"] / v for k, v in us.items() if k.startswith("path")}}
        print(f"M={m}: " + ", ".join(f"{k} {v:.1f}" for k, v in us.items()) + " us/layer; "
              + ", ".join(f"{k} {v:.2f}x" for k, v in row["speedup"].items()) + f"; err {err:.1e}", flush=True)
        rows.append(row)
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
