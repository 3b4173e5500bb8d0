"""The hybrid block's order of work, measured on the GPU at hand (development tool).

Hot first, scanning (SparsePolicy.hybrid_lists=False): gate GEMM, hot up GEMM, relu_mul, hot down GEMM into a
bf16 `init`, then the cold kernel, which scans the activation and starts from `init`. Hot first, listed (the
default): relu_list.cu's pass (the hot glue and each row's cold list) instead of relu_mul, and the cold kernel
reads the lists. Cold first: the cold kernel without init, then the hot down GEMM adding into its result (cuBLAS
beta = 1), scanning or listed. Also timed: the parts alone, the list pass's builds (scan step LIST_STEP, hot glue
step LIST_GLUE), and the default block with the cold kernel's builds (a listed row's up dots one at a time, as
before session 16: FFN_UP_PAIRS=0) and the list pass's (an L2 prefetch of the row, as before session 16:
LIST_PREFETCH=1); and the default block run over chunks of tokens (HYBRID_ORDER_CHUNKS=4096,8192; none by default:
3-34% slower than the whole layer at every shape, session 16), whose activation can stay in L2 between the gate
GEMM and the list pass. And the gate GEMM alone and with the hot up GEMM. (Session 17 also timed the two as one
GEMM over stacked weights: no faster, removed; BENCHMARKS.md.)
Rows: PERFORMANCE.md's inputs on packed layers, ROUNDS interleaved rounds, best round per cell.

    python3 tests/gpu/hybrid_order.py OUT.json      # HYBRID_ORDER_SHAPES=65536x29,16384x29,65536x112
    HYBRID_ORDER_LAYER=full: the layer with every neuron, hot first (the ffn suite's "sparse" rows), not packed
"""

from __future__ import annotations

import os
import sys

import torch

from sparsify_cli.bench.ffn import _rel, cuda_time, dense_block
from sparsify_cli.kernels import ffn_forward, launchers, ops
from sparsify_cli.kernels.ffn import SparsePolicy
from prefill_rows import packed_inputs, run_rows, shapes  # tests/gpu, beside this script

ROUNDS = int(os.environ.get("HYBRID_ORDER_ROUNDS", "4"))
CHUNKS = [int(v) for v in os.environ.get("HYBRID_ORDER_CHUNKS", "").split(",") if v]
HOT_FIRST = SparsePolicy(hybrid_lists=False)


def cold_first_scanning(x, pk):
    """Cold first without lists: relu_mul, the cold kernel scanning act, then out += hot."""
    act = x @ pk.gate.T
    h_hot = ops.relu_mul(act, pk.n_hot, x @ pk.up[:pk.n_hot].T)
    out = torch.empty_like(x)
    launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot)
    return out.addmm_(h_hot, pk.down_t[:pk.n_hot])


def cold_first_listed(x, pk):
    """Cold first from lists: relu_list.cu's pass, the cold kernel reading the lists (no init), then out += hot."""
    act = x @ pk.gate.T
    h_hot, lists = ops.relu_list(act, pk.n_hot, x @ pk.up[:pk.n_hot].T)
    out = torch.empty_like(x)
    launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot, lists=lists)
    return out.addmm_(h_hot, pk.down_t[:pk.n_hot])


COLD_BUILDS = {"default": (), "up dots one at a time": ("FFN_UP_PAIRS=0",)}
LIST_BUILDS = {"default": (), "L2 prefetch": ("LIST_PREFETCH=1",)}


def listed_build(x, pk, cold: tuple[str, ...] = (), listing: tuple[str, ...] = ()):
    """The default hybrid (hot first, listed) with the cold kernel built with ``cold`` defines and the list pass
    with ``listing``."""
    act = x @ pk.gate.T
    u = x @ pk.up[:pk.n_hot].T
    h_hot = torch.empty_like(u)
    lists = torch.empty(x.shape[0], launchers.LIST_SLOTS, dtype=torch.int32, device=x.device)
    launchers.launch_relu_list(act, pk.n_hot, u, h_hot, lists, listing)
    out = torch.empty_like(x)
    launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot, init=h_hot @ pk.down_t[:pk.n_hot],
                              lists=lists, defines=launchers.FFN_DEFAULT_DEFINES + cold)
    return out


def chunked(x, pk, chunk: int):
    """The default hybrid over blocks of ``chunk`` tokens, one after another, into one output. Each block's
    activation (chunk x width bf16, 32 MB at 4096 tokens, one buffer reused) is written by the gate GEMM and read
    by the list pass while it can still be in L2 (50 MB), where the whole layer's activation (520 MB at 65536
    tokens) goes to DRAM and back; the price: GEMMs 16 times smaller, each with its own last wave."""
    m = x.shape[0]
    out = torch.empty_like(x)
    act = torch.empty(min(chunk, m), pk.width, dtype=x.dtype, device=x.device)
    for s in range(0, m, chunk):
        xs = x[s:s + chunk]
        a = act[:xs.shape[0]]
        torch.matmul(xs, pk.gate.T, out=a)
        h_hot, lists = ops.relu_list(a, pk.n_hot, xs @ pk.up[:pk.n_hot].T)
        launchers.launch_relu_ffn(xs, a, pk.up, pk.down_t, out[s:s + xs.shape[0]], c_start=pk.n_hot,
                                  init=h_hot @ pk.down_t[:pk.n_hot], lists=lists)
    return out


def parts(x, pk) -> dict:
    """The cold kernel alone scanning act and reading lists, and the passes in front of it alone."""
    act = x @ pk.gate.T
    u = x @ pk.up[:pk.n_hot].T
    h_hot, lists = ops.relu_list(act, pk.n_hot, u)
    out = torch.empty_like(x)
    counts = lists[:, 0].double()
    res = {"relu_mul (hot glue alone)": cuda_time(lambda: ops.relu_mul(act, pk.n_hot, u), 20)}
    for name, extra in LIST_BUILDS.items():
        res[f"list pass, {name}"] = cuda_time(
            lambda: launchers.launch_relu_list(act, pk.n_hot, u, h_hot, lists, extra), 20)
    res.update({
        "cold kernel scanning act": cuda_time(
            lambda: launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot), 20),
        "cold kernel reading lists": cuda_time(
            lambda: launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot, lists=lists), 20),
        **{f"cold kernel reading lists, {name}": cuda_time(
            lambda: launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot, lists=lists,
                                              defines=launchers.FFN_DEFAULT_DEFINES + extra), 20)
           for name, extra in COLD_BUILDS.items() if extra},
        "hot down GEMM, beta=0": cuda_time(lambda: h_hot @ pk.down_t[:pk.n_hot], 20),
        "hot down GEMM into out, beta=1": cuda_time(lambda: out.addmm_(h_hot, pk.down_t[:pk.n_hot]), 20),
        "cold entries per row (mean, max)": (float(counts.mean()), float(counts.max())),
        "rows overflowing the list": int((counts > launchers.LIST_SLOTS - 1).sum()),
    })
    return res


def row(m: int, nnz: int) -> dict:
    # HYBRID_ORDER_LAYER=full: every neuron kept, hot first (the suite's sparse rows)
    inp, pk = packed_inputs(m, nnz, full=os.environ.get("HYBRID_ORDER_LAYER") == "full")
    x = inp.x
    ref32 = dense_block(x[:4096].float(), inp.gate.float(), inp.up.float(), inp.down.float())

    def block(policy):
        return lambda: ffn_forward(x, pk.gate, pk.up, pk.down_t, kernels="cuda", mode="sparse", n_hot=pk.n_hot,
                                   policy=policy)

    hybrids = {"hot first, scanning": block(HOT_FIRST), "hot first, listed (default)": block(SparsePolicy()),
               "cold first, scanning": lambda: cold_first_scanning(x, pk),
               "cold first, listed": lambda: cold_first_listed(x, pk),
               **{f"chunks of {c} tokens": (lambda c: lambda: chunked(x, pk, c))(c) for c in CHUNKS if c < m}}
    builds = {**{f"hot first, listed, cold kernel {name}": (lambda e: lambda: listed_build(x, pk, cold=e))(extra)
                 for name, extra in COLD_BUILDS.items() if extra},
              **{f"hot first, listed, list pass {name}": (lambda e: lambda: listed_build(x, pk, listing=e))(extra)
                 for name, extra in LIST_BUILDS.items() if extra}}
    fns = {"dense": lambda: dense_block(x, inp.gate, inp.up, inp.down), **hybrids, **builds,
           "gate GEMM": lambda: x @ pk.gate.T, "gate + hot up GEMMs": lambda: (x @ pk.gate.T, x @ pk.up[:pk.n_hot].T)}
    rounds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            rounds[k].append(cuda_time(fn, 20))
    ms = {k: min(v) for k, v in rounds.items()}
    outs = {k: fn()[:4096] for k, fn in hybrids.items()}
    return {"M": m, "nnz_target": nnz, "width": pk.width, "n_hot": pk.n_hot, "ms": ms,
            "speedup": {k: ms["dense"] / ms[k] for k in hybrids},
            "rel_err": {k: _rel(o, ref32) for k, o in outs.items()},
            "same_bits": {"cold first: listed vs scanning": bool(torch.equal(outs["cold first, listed"],
                                                                             outs["cold first, scanning"])),
                          "hot first: listed vs scanning": bool(torch.equal(outs["hot first, scanning"],
                                                                            outs["hot first, listed (default)"]))},
            "chunks_same_bits": {f"chunks of {c} tokens": bool(torch.equal(chunked(x, pk, c), hybrids[
                "hot first, listed (default)"]())) for c in CHUNKS if c < m},
            "builds_same_bits": {k: bool(torch.equal(fn()[:4096], outs["hot first, listed (default)"]))
                                 for k, fn in builds.items()},
            "parts_alone_ms": parts(x, pk), "ms_rounds": rounds}


def main() -> None:
    pairs = shapes("HYBRID_ORDER_SHAPES", [(65536, 29), (16384, 29), (65536, 112)])
    run_rows(sys.argv[1], "rows", pairs, row, rounds=ROUNDS)


if __name__ == "__main__":
    main()
