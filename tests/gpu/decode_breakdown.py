"""Where the decode path from the activation (above 16 tokens, or without a known density) spends its time, at
99.5% sparsity, D=2048, H=5632 and on the same layers packed (development tool). Each part is timed alone as a
CUDA-graph replay over 8 layers (median of 100 replays, best of ROUNDS interleaved rounds): dense, the cuBLAS gate
GEMM, the up-dot kernel (decode_up_act_kernel) on precomputed activations, the down kernel on precomputed h (listing
the h row), the two together (PDL as the default launch, the segment lists on), the whole path, and the two kernels
on an all-negative activation (no active pair: their fixed cost); the pair and the whole path also without the
segment lists (``_no_seg_lists``); the up-dot kernel and the whole path (segment lists on; before session 22 these
rows listed the h row) also with each of that kernel's builds (UP_BUILDS). (Session 17 also timed a one-kernel version of the pair here, decode_token.cu in commit 356db60, not
kept: BENCHMARKS.md.)

    python3 tests/gpu/decode_breakdown.py OUT.json [M ...]      # DECODE_BREAKDOWN_ROUNDS=3
"""

from __future__ import annotations

import json
import os
import sys

import torch

from sparsify_cli.bench.ffn import (CALIB_TOKENS, calib_tokens, cuda_time, decode_layers, dense_block, graph_replay,
                                    packed_layer)
from sparsify_cli.kernels import launchers

ROUNDS = int(os.environ.get("DECODE_BREAKDOWN_ROUNDS", "3"))


def parts(x, layers: list[tuple], dense_sets) -> dict:
    """layers: (gate, up, down_t) per layer, as the path runs them."""
    acts = [x @ g.T for g, _, _ in layers]
    dead = [-a.abs() - 1 for a in acts]  # no neuron active
    hbufs = [launchers.launch_decode_up_act(x, a, u) for a, (_, u, _) in zip(acts, layers)]
    o = torch.empty_like(x)

    def path(act_list):
        return lambda: [launchers.launch_relu_ffn(x, a, u, dt, o, path="decode")
                        for a, (_, u, dt) in zip(act_list, layers)]

    return {
        "dense": lambda: [dense_block(x, s.gate, s.up, s.down) for s in dense_sets],
        "gate_gemm": lambda: [x @ g.T for g, _, _ in layers],
        "up_act_kernel": lambda: [launchers.launch_decode_up_act(x, a, u) for a, (_, u, _) in zip(acts, layers)],
        "down_kernel": lambda: [launchers.launch_decode_down(hb, dt, o, a.shape[1])
                                for hb, a, (_, _, dt) in zip(hbufs, acts, layers)],
        "both_kernels": path(acts),
        "both_kernels_no_active": path(dead),
        "whole_path": lambda: [launchers.launch_relu_ffn(x, x @ g.T, u, dt, o, path="decode") for g, u, dt in layers],
        "whole_path_no_seg_lists": lambda: [launchers.launch_relu_ffn(x, x @ g.T, u, dt, o, path="decode",
                                                                      seg_lists=False) for g, u, dt in layers],
        "both_kernels_no_seg_lists": lambda: [launchers.launch_relu_ffn(x, a, u, dt, o, path="decode",
                                                                        seg_lists=False)
                                              for a, (_, u, dt) in zip(acts, layers)],
        # the up-dot kernel's other builds (UP_BUILDS), alone and in the whole path
        **{f"up_act_kernel_{name}": (lambda b: lambda: [launchers.launch_decode_up_act(x, a, u, defines=b)
                                                        for a, (_, u, _) in zip(acts, layers)])(build)
           for name, build in UP_BUILDS.items()},
        **{f"whole_path_{name}": (lambda b: lambda: [build_path(x, x @ g.T, u, dt, o, b) for g, u, dt in layers])(build)
           for name, build in UP_BUILDS.items()},
    }


# as before session 20 (8 warps, two dots each, x through L1), and each of the default's two builds whatever the grid
UP_BUILDS = {"before": launchers.UP_ACT_X_FROM_L1, "w16": launchers.UP_ACT_ONE_PER_SM,
             "w12": launchers.UP_ACT_TWO_PER_SM}


def build_path(x, act, up, down_t, out, build):
    """launch_relu_ffn's decode path (segment lists, PDL as default) with a build of the up-dot kernel."""
    pdl = launchers.pdl_default(x.device)
    seg = launchers.decode_seg_buffers(x.shape[0], act.shape[1], x.device)
    hbuf = launchers.launch_decode_up_act(x, act, up, pdl=pdl, defines=build, seg=seg)
    launchers.launch_decode_down(hbuf, down_t, out, act.shape[1], pdl=pdl, seg=seg)


def main() -> None:
    out = sys.argv[1]
    ms = [int(v) for v in sys.argv[2:]] or [1, 17, 32, 64]
    n_layers, reps = 8, 100
    rows = []
    for m in ms:
        sets, downs_t = decode_layers(m, n_layers, 500)
        x = sets[0].x
        calib = calib_tokens(CALIB_TOKENS, 7)
        packed = [packed_layer(s.gate, s.up, dt, calib) for s, dt in zip(sets, downs_t)]
        del calib
        for name, layers in (("full", [(s.gate, s.up, dt) for s, dt in zip(sets, downs_t)]),
                             ("packed", [(p.gate, p.up, p.down_t) for p in packed])):
            replays = {k: graph_replay(fn) for k, fn in parts(x, layers, sets).items()}
            rounds: dict[str, list[float]] = {k: [] for k in replays}
            for _ in range(ROUNDS):
                for k, r in replays.items():
                    rounds[k].append(cuda_time(r, reps) / n_layers * 1e3)
            us = {k: min(v) for k, v in rounds.items()}
            row = {"M": m, "layer": name, "us": us, "us_rounds": rounds,
                   "speedup": us["dense"] / us["whole_path"]}
            print(f"M={m} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in us.items()) + " (us per layer)",
                  flush=True)
            rows.append(row)
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rounds": ROUNDS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
