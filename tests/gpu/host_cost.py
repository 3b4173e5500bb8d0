"""Where the sparse prefill block's host time goes, and what it costs the suite's per-call timing (development tool).

block_gaps.py found the sparse block 0.05-0.08 ms slower timed per call (the suite's method) than pipelined or as a
CUDA graph, and its host side 0.26-0.33 ms per call against dense's 0.08-0.13. Per shape (packed layer), ROUNDS
interleaved rounds, best round per cell, per call and pipelined, and each variant's host time:
  dense; the default block (ffn_forward); the same kernels launched straight from the launchers (no op, no
  ffn_forward); the default's calls with both ops through the dispatcher (ops.X.op, as before session 17); then a
  cProfile of 50 default calls (each followed by a sync), top entries.

    python3 tests/gpu/host_cost.py OUT.json      # HOST_SHAPES=16384x29,65536x29
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys

import torch

from sparsify_cli.bench.ffn import cuda_time, dense_block
from sparsify_cli.kernels import ffn_forward, launchers, ops
from block_gaps import host_ms, pipelined  # tests/gpu, beside this script
from prefill_rows import packed_inputs, run_rows, shapes

ROUNDS = int(os.environ.get("HOST_ROUNDS", "3"))


def direct(x, pk):
    """The default hybrid's kernels (hot first, listed) launched from the launchers, no custom op."""
    act = x @ pk.gate.T
    u = x @ pk.up[:pk.n_hot].T
    h_hot = torch.empty_like(u)
    lists = torch.empty(x.shape[0], launchers.LIST_SLOTS, dtype=torch.int32, device=x.device)
    launchers.launch_relu_list(act, pk.n_hot, u, h_hot, lists)
    out = torch.empty_like(x)
    launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot, init=h_hot @ pk.down_t[:pk.n_hot],
                              lists=lists)
    return out


def via_dispatcher(x, pk):
    """The default hybrid's calls with both ops through the dispatcher (as every call went before session 17)."""
    act = x @ pk.gate.T
    h_hot, lists = ops.relu_list.op(act, pk.n_hot, x @ pk.up[:pk.n_hot].T)
    return ops.relu_ffn.op(x, act, pk.up, pk.down_t, pk.n_hot, h_hot @ pk.down_t[:pk.n_hot], lists)


def row(m: int, nnz: int) -> dict:
    inp, pk = packed_inputs(m, nnz)
    x = inp.x
    fns = {"dense": lambda: dense_block(x, inp.gate, inp.up, inp.down),
           "default": lambda: ffn_forward(x, pk.gate, pk.up, pk.down_t, kernels="cuda", mode="sparse",
                                          n_hot=pk.n_hot),
           "direct launchers": lambda: direct(x, pk),
           "ops through the dispatcher": lambda: via_dispatcher(x, pk)}
    same = all(torch.equal(fns["default"](), fns[k]()) for k in ("direct launchers", "ops through the dispatcher"))
    cells = {f"{k} {how}": f for k in fns for how, f in (("per call", lambda f=fns[k]: cuda_time(f, 20)),
                                                          ("pipelined", lambda f=fns[k]: pipelined(f)))}
    rounds: dict[str, list[float]] = {k: [] for k in cells}
    for _ in range(ROUNDS):
        for k, f in cells.items():
            rounds[k].append(f())
    ms = {k: min(v) for k, v in rounds.items()}
    prof = cProfile.Profile()
    for _ in range(50):
        prof.enable()
        fns["default"]()
        prof.disable()
        torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    return {"M": m, "nnz_target": nnz, "n_hot": pk.n_hot, "ms": ms, "same_bits": same,
            "host_ms": {k: host_ms(f, 50) for k, f in fns.items()}, "ms_rounds": rounds,
            "cprofile_default_50_calls": s.getvalue()[-6000:]}


def main() -> None:
    run_rows(sys.argv[1], "rows", shapes("HOST_SHAPES", [(16384, 29), (65536, 29)]), row, rounds=ROUNDS)


if __name__ == "__main__":
    main()
