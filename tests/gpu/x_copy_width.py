"""The prefill kernel's x copy in shared memory at model widths D 2048 and 4096 (development tool).

The copy holds up to FFN_ACT_X_SMEM = 4096 columns for the hybrid's cold kernel (FROM_ACT); session 15 measured
it at D 2048 only. This times the cold kernel alone, reading lists, with the copy (the default) and with x read
through L1 (FFN_ACT_X_SMEM=0), in interleaved rounds, on a hot-first layer with every neuron (H = 2.75 D rounded
to 64, nnz 29, PERFORMANCE.md's inputs), and checks the two give the same bits.

    python3 tests/gpu/x_copy_width.py OUT.json     # X_COPY_M=16384, X_COPY_ROUNDS=5
"""

from __future__ import annotations

import json
import os
import sys

import torch

from sparsify_cli.bench.ffn import cuda_time, environment
from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels import launchers, ops
from sparsify_cli.kernels.ffn import hot_first_order

M = int(os.environ.get("X_COPY_M", "16384"))
ROUNDS = int(os.environ.get("X_COPY_ROUNDS", "5"))
BUILDS = {"x copy in shared memory (default)": (), "x through L1": ("FFN_ACT_X_SMEM=0",)}


def row(d: int) -> dict:
    h = (int(2.75 * d) + 63) // 64 * 64
    inp = make_ffn_inputs(M, d, h, 29, device="cuda", seed=d)
    act0 = inp.x @ inp.gate.T
    perm, n_hot = hot_first_order((act0 > 0).float().mean(0))
    del act0
    gate, up, down_t = inp.gate[perm].contiguous(), inp.up[perm].contiguous(), inp.down.T[perm].contiguous()
    x = inp.x
    act = x @ gate.T
    h_hot, lists = ops.relu_list(act, n_hot, x @ up[:n_hot].T)
    init = h_hot @ down_t[:n_hot]
    outs = {k: torch.empty_like(x) for k in BUILDS}

    def cold(name):
        return lambda: launchers.launch_relu_ffn(x, act, up, down_t, outs[name], c_start=n_hot, init=init,
                                                 lists=lists, defines=launchers.FFN_DEFAULT_DEFINES + BUILDS[name])

    rounds = {k: [] for k in BUILDS}
    for _ in range(ROUNDS):
        for k in BUILDS:
            rounds[k].append(cuda_time(cold(k), 20))
    names = list(BUILDS)
    return {"D": d, "H": h, "M": M, "n_hot": n_hot, "cold entries per row": float(lists[:, 0].double().mean()),
            "ms": {k: min(v) for k, v in rounds.items()}, "ms_rounds": rounds,
            "same_bits": bool(torch.equal(outs[names[0]], outs[names[1]]))}


def main() -> None:
    res = {"environment": environment(), "rows": []}
    for d in (2048, 4096):
        r = row(d)
        res["rows"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "ms_rounds"}), flush=True)
        torch.cuda.empty_cache()
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
