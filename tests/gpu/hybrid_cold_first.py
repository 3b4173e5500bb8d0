"""The hybrid block hot first (the hot down GEMM, then the cold kernel starting from its result) against cold first
(the cold kernel from zero, then the hot down GEMM adding into its result, cuBLAS beta 1), as ffn_forward runs
them (SparsePolicy.cold_first_max_m), captured in CUDA graphs like the ffn suite (development tool).
Rows: PERFORMANCE.md's inputs on packed layers, ROUNDS interleaved rounds of graph replays, best round per cell;
the error of each against the fp32 block.

    python3 tests/gpu/hybrid_cold_first.py OUT.json   # COLD_FIRST_SHAPES=8192x29,16384x29,...  COLD_FIRST_ROUNDS=6
"""

from __future__ import annotations

import os
import sys

from sparsify_cli.bench.ffn import _rel, cuda_time, dense_block, graph_replay
from sparsify_cli.kernels import ffn_forward
from sparsify_cli.kernels.ffn import SparsePolicy
from prefill_rows import packed_inputs, run_rows, shapes  # tests/gpu, beside this script

ROUNDS = int(os.environ.get("COLD_FIRST_ROUNDS", "6"))
ORDERS = {"hot first": SparsePolicy(cold_first_max_m=0), "cold first": SparsePolicy(cold_first_max_m=1 << 30)}


def row(m: int, nnz: int) -> dict:
    inp, pk = packed_inputs(m, nnz)
    x = inp.x
    ref32 = dense_block(x[:4096].float(), inp.gate.float(), inp.up.float(), inp.down.float())

    def block(policy):
        return lambda: ffn_forward(x, pk.gate, pk.up, pk.down_t, kernels="cuda", mode="sparse", n_hot=pk.n_hot,
                                   policy=policy)

    fns = {"dense": lambda: dense_block(x, inp.gate, inp.up, inp.down),
           **{name: block(policy) for name, policy in ORDERS.items()}}
    errs = {name: _rel(fn()[:4096], ref32) for name, fn in fns.items()}
    replays = {name: graph_replay(fn) for name, fn in fns.items()}
    rounds: dict[str, list[float]] = {k: [] for k in replays}
    for _ in range(ROUNDS):
        for k, r in replays.items():
            rounds[k].append(cuda_time(r, 20))
    ms = {k: min(v) for k, v in rounds.items()}
    return {"M": m, "nnz_target": nnz, "width": pk.width, "n_hot": pk.n_hot, "ms": ms,
            "speedup": {k: ms["dense"] / ms[k] for k in ORDERS},
            "cold_first_over_hot_first": ms["cold first"] / ms["hot first"],
            "rel_err": errs, "ms_rounds": rounds}


def main() -> None:
    pairs = shapes("COLD_FIRST_SHAPES", [(8192, 29), (16384, 29), (32768, 29), (65536, 29), (16384, 56),
                                         (65536, 56), (16384, 112), (65536, 112)])
    run_rows(sys.argv[1], "rows", pairs, row, rounds=ROUNDS)


if __name__ == "__main__":
    main()
