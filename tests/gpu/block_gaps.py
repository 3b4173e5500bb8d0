"""How much of a prefill block's measured time is not kernel time (development tool).

The suite times one call between two CUDA events after the GPU went idle (PERFORMANCE.md's method), so the host's
time to reach the first kernel, and any point where the GPU waits for the host inside the block, count. For the
dense block and the sparse (packed, hybrid) block, per shape, ROUNDS interleaved rounds, best round per cell:
  per call   cuda_time (the suite's number);
  pipelined  20 calls between two events, per call (the host runs ahead, as across a model's layers);
  graph      the block captured in a CUDA graph and replayed (no host work at all);
  host       wall time of one call's host side (no sync), median;
  kernels    from a profiler trace of single calls: the kernels' summed time and the span from the first kernel's
             start to the last one's end (span - sum = the GPU idle inside the block), medians.

    python3 tests/gpu/block_gaps.py OUT.json      # GAPS_SHAPES=16384x29,65536x29
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch

from sparsify_cli.bench.ffn import cuda_time, dense_block, graph_replay
from sparsify_cli.kernels import ffn_forward
from prefill_rows import packed_inputs, run_rows, shapes  # tests/gpu, beside this script

ROUNDS = int(os.environ.get("GAPS_ROUNDS", "3"))


def pipelined(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


def host_ms(fn, n: int = 20) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def kernel_span(fn, calls: int = 5) -> dict:
    """Median over single profiled calls of the kernels' summed time and their first-start-to-last-end span."""
    sums, spans = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            prof.export_chrome_trace(f.name)
            trace = json.load(open(f.name))
        ks = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")
              and "dur" in e]
        if not ks:
            continue
        sums.append(sum(e["dur"] for e in ks) / 1e3)
        spans.append((max(e["ts"] + e["dur"] for e in ks) - min(e["ts"] for e in ks)) / 1e3)
    return {"kernels_sum_ms": statistics.median(sums), "kernels_span_ms": statistics.median(spans),
            "kernels": len(ks)}


def row(m: int, nnz: int) -> dict:
    inp, pk = packed_inputs(m, nnz)
    x = inp.x
    fns = {"dense": lambda: dense_block(x, inp.gate, inp.up, inp.down),
           "sparse": lambda: ffn_forward(x, pk.gate, pk.up, pk.down_t, kernels="cuda", mode="sparse",
                                         n_hot=pk.n_hot)}
    graphs = {k: graph_replay(fn) for k, fn in fns.items()}
    cells = {f"{k} {how}": f for k in fns for how, f in (("per call", lambda f=fns[k]: cuda_time(f, 20)),
                                                          ("pipelined", lambda f=fns[k]: pipelined(f)),
                                                          ("graph", lambda g=graphs[k]: cuda_time(g, 20)))}
    rounds: dict[str, list[float]] = {k: [] for k in cells}
    for _ in range(ROUNDS):
        for k, f in cells.items():
            rounds[k].append(f())
    ms = {k: min(v) for k, v in rounds.items()}
    return {"M": m, "nnz_target": nnz, "width": pk.width, "n_hot": pk.n_hot, "ms": ms,
            "ratio": {how: ms[f"dense {how}"] / ms[f"sparse {how}"] for how in ("per call", "pipelined", "graph")},
            "host_ms": {k: host_ms(f) for k, f in fns.items()},
            "trace": {k: kernel_span(f) for k, f in fns.items()}, "ms_rounds": rounds}


def main() -> None:
    run_rows(sys.argv[1], "rows", shapes("GAPS_SHAPES", [(16384, 29), (65536, 29)]), row, rounds=ROUNDS)


if __name__ == "__main__":
    main()
