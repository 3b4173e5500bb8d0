"""The hybrid prefill block with its gate projection by the Hopper GEMM that lists from its epilogue
(ffn.gate_listed_hybrid, SparsePolicy.gate_list_epilogue) against the listed path it replaces (cuBLAS's gate GEMM,
then relu_list.cu's pass), on packed layers (development tool, compute capability 9.0).

Per shape: dense; the block both ways and their parts (the gate GEMM: cuBLAS's, the Hopper GEMM writing every
tile, the Hopper GEMM listing; the list pass; the relu_mul glue), each as CUDA-graph replays (a few calls per
graph), ROUNDS interleaved rounds, best round per cell; whether the two blocks agree bit for bit on the Hopper
GEMM's activation, and the overflowed tiles of the words; the same for other builds of the kernel (GATE_LIST_BUILDS,
";"-separated builds of ","-separated defines; default: GEMM_LIST_FAST=1, the prepared lister).

    python3 tests/gpu/gate_list_ab.py OUT.json      # GATE_LIST_SHAPES=16384x29,65536x29 GATE_LIST_ROUNDS=5
"""

from __future__ import annotations

import os
import sys

import torch

from sparsify_cli.bench.ffn import cuda_time, dense_block, graph_replay
from sparsify_cli.kernels import ffn, hopper, launchers, ops
from prefill_rows import packed_inputs, run_rows, shapes  # tests/gpu, beside this script

ROUNDS = int(os.environ.get("GATE_LIST_ROUNDS", "5"))
# kernel builds beside the default: ";"-separated, each ","-separated defines (e.g. GEMM_LIST_FAST=1)
BUILDS = [tuple(b.split(",")) for b in os.environ.get("GATE_LIST_BUILDS", "GEMM_LIST_FAST=1").split(";") if b]


def _graph(fn, calls: int):
    replay = graph_replay(lambda: [fn() for _ in range(calls)])
    return lambda: cuda_time(replay, 10) / calls


def row(m: int, nnz: int) -> dict:
    inp, pk = packed_inputs(m, nnz)
    x = inp.x
    listed = ffn.SparsePolicy(gate_list_epilogue=False)
    calls = 4 if m <= 16384 else 2

    def old():
        return ffn.ffn_forward(x, pk.gate, pk.up, pk.down_t, kernels="cuda", mode="sparse", n_hot=pk.n_hot,
                               policy=listed)

    def new():
        return ffn.gate_listed_hybrid(x, pk.gate, pk.up, pk.down_t, pk.n_hot)

    def new_build(defines):  # gate_listed_hybrid with that build of the kernel
        def run():
            a, wd = hopper.gate_list(x, pk.gate, pk.n_hot, hopper.LIST_SLOTS, defines)
            h = ops.relu_mul(a, pk.n_hot, x @ pk.up[:pk.n_hot].T)
            return ops.relu_ffn(x, a, pk.up, pk.down_t, pk.n_hot, h @ pk.down_t[:pk.n_hot], wd)
        return run

    act = hopper.matmul(x, pk.gate)
    listed_on_act = ffn.hybrid_ffn(x, act, pk.up, pk.down_t, pk.n_hot)
    same = torch.equal(new(), listed_on_act) and all(torch.equal(new_build(b)(), listed_on_act) for b in BUILDS)
    _, words = ops.gate_list(x, pk.gate, pk.n_hot, hopper.LIST_SLOTS)
    over = words[:, :, 0] > hopper.LIST_SLOTS - 1
    u = x @ pk.up[:pk.n_hot].T
    h_hot = torch.empty_like(u)
    lists = torch.empty(m, launchers.LIST_SLOTS, dtype=torch.int32, device=x.device)
    cells = {
        "dense": _graph(lambda: dense_block(x, inp.gate, inp.up, inp.down), calls),
        "block, cuBLAS gate + list pass": _graph(old, calls),
        "block, Hopper gate listing": _graph(new, calls),
        "gate GEMM, cuBLAS": _graph(lambda: x @ pk.gate.T, calls),
        "gate GEMM, Hopper, every tile": _graph(lambda: hopper.matmul(x, pk.gate), calls),
        "gate GEMM, Hopper, listing": _graph(lambda: ops.gate_list(x, pk.gate, pk.n_hot, hopper.LIST_SLOTS), calls),
        "list pass": _graph(lambda: launchers.launch_relu_list(act, pk.n_hot, u, h_hot, lists), calls),
        "relu_mul glue": _graph(lambda: ops.relu_mul(act, pk.n_hot, u), calls),
    }
    for b in BUILDS:
        name = "+".join(b)
        cells[f"block, Hopper gate listing, {name}"] = _graph(new_build(b), calls)
        cells[f"gate GEMM, Hopper, listing, {name}"] = _graph(
            lambda b=b: hopper.gate_list(x, pk.gate, pk.n_hot, hopper.LIST_SLOTS, b), calls)
    rounds: dict[str, list[float]] = {k: [] for k in cells}
    for _ in range(ROUNDS):
        for k, f in cells.items():
            rounds[k].append(f())
    ms = {k: min(v) for k, v in rounds.items()}
    return {"M": m, "nnz_target": nnz, "width": pk.width, "n_hot": pk.n_hot, "ms": ms, "ms_rounds": rounds,
            "speedup_old": ms["dense"] / ms["block, cuBLAS gate + list pass"],
            "speedup_new": ms["dense"] / ms["block, Hopper gate listing"],
            "same_bits_on_its_activation": same, "overflowed_tiles": int(over.sum().item()),
            "rows_with_overflow": int(over.any(1).sum().item())}


def main() -> None:
    pairs = shapes("GATE_LIST_SHAPES", [(16384, 29), (65536, 29), (16384, 56), (65536, 56), (16384, 112),
                                         (65536, 112)])
    run_rows(sys.argv[1], "rows", pairs, row, rounds=ROUNDS, gpu=torch.cuda.get_device_name())


if __name__ == "__main__":
    main()
