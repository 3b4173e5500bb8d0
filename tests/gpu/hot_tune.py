"""How many neurons the hybrid should compute densely, measured on the GPU at hand (development tool).

`sparsify pack` puts the neurons firing on more than 1.6% of calibration tokens first (rounded up to 128) and the
prefill path computes those with cuBLAS, the rest with the sparse kernel (kernels/ffn.py hot_first_order). That
threshold comes from one H100 sweep in session 1, before the packed layout, the one-kernel hot glue (session 11)
and the H200. A packed layer is sorted by firing rate, so any n_hot is a valid split of the same weights: this
tool times the block at several n_hot per prefill shape (packed layer, PERFORMANCE.md's inputs), interleaved over
ROUNDS rounds (best round per cell), with dense in the same rounds, and the share of entries each split leaves to
the sparse kernel.

    python3 tests/gpu/hot_tune.py OUT.json      # HOT_TUNE_SHAPES=65536x29,16384x29; HOT_TUNE_N=256,512,768

Each row also breaks the block at pack's n_hot down by kernel, inside the block (torch.profiler over BREAKDOWN_CALLS
calls, median per kernel) and each part alone (CUDA events): session 13 saw a kernel's gain alone not come off the
block, so a part that takes longer inside the block than alone is where the parts interfere (L2, the GEMMs' tails;
session 14: none did). And the scanning cold kernel's cost per token and per cold entry (cold_cost).
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

from sparsify_cli.bench.ffn import PREFILL_M, PREFILL_NNZ, _rel, cuda_time, dense_block
from sparsify_cli.bench.measure import kernel_ms
from sparsify_cli.kernels import ffn_forward, launchers, ops
from sparsify_cli.kernels.ffn import hot_part
from prefill_rows import packed_inputs, run_rows, shapes  # tests/gpu, beside this script

ROUNDS = int(os.environ.get("HOT_TUNE_ROUNDS", "3"))
N_HOT = [int(v) for v in os.environ.get("HOT_TUNE_N", "256,384,512,640,768,1024,1280,1536,2048").split(",")]
BREAKDOWN_CALLS = 7


def row(m: int, nnz: int) -> dict:
    inp, pk = packed_inputs(m, nnz)
    x = inp.x
    act = x @ pk.gate.T
    on = (act > 0).sum(0).double()  # (width,) entries per neuron on the timed tokens
    total = float(on.sum())
    del act
    ref32 = dense_block(x[:4096].float(), inp.gate.float(), inp.up.float(), inp.down.float())

    def block(k: int):
        return lambda: ffn_forward(x, pk.gate, pk.up, pk.down_t, kernels="cuda", mode="sparse", n_hot=k)

    splits = sorted({k for k in N_HOT + [pk.n_hot] if 0 < k < pk.width})
    fns = {"dense": lambda: dense_block(x, inp.gate, inp.up, inp.down)}
    fns.update({f"n_hot={k}": block(k) for k in splits})
    rounds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            rounds[k].append(cuda_time(fn, 20))
    ms = {k: min(v) for k, v in rounds.items()}
    out = {"M": m, "nnz_target": nnz, "nnz_mean": total / m, "width": pk.width, "pack_n_hot": pk.n_hot,
           "dense_ms": ms["dense"], "splits": []}
    for k in splits:
        t = ms[f"n_hot={k}"]
        out["splits"].append({"n_hot": k, "ms": t, "speedup": ms["dense"] / t,
                              "cold_entry_share": float(on[k:].sum()) / total,
                              "rel_err": _rel(block(k)()[:4096], ref32)})
    best = min(out["splits"], key=lambda s: s["ms"])
    out["best_n_hot"], out["best_ms"] = best["n_hot"], best["ms"]
    out["pack_ms"] = ms[f"n_hot={pk.n_hot}"]
    out["ms_rounds"] = rounds
    out["breakdown"] = breakdown(x, pk, block(pk.n_hot))
    out["cold_cost"] = cold_cost(x, pk)
    return out


def breakdown(x, pk, block) -> dict:
    """The block's kernels inside it (median over BREAKDOWN_CALLS profiled calls) and its parts alone, the parts
    as the default hybrid runs them (ffn.hybrid_ffn with lists)."""
    calls = [kernel_ms(block) for _ in range(BREAKDOWN_CALLS)]
    names = sorted({k for c in calls for k in c})
    inside = {k: statistics.median(c.get(k, 0.0) for c in calls) for k in names}
    act = x @ pk.gate.T
    u = x @ pk.up[:pk.n_hot].T
    h_hot, lists = ops.relu_list(act, pk.n_hot, u)
    hot = h_hot @ pk.down_t[:pk.n_hot]
    out = torch.empty_like(x)
    alone = {"gate GEMM": cuda_time(lambda: x @ pk.gate.T, 20),
             "hot up GEMM": cuda_time(lambda: x @ pk.up[:pk.n_hot].T, 20),
             "list pass (hot glue + cold lists)": cuda_time(lambda: ops.relu_list(act, pk.n_hot, u), 20),
             "hot down GEMM": cuda_time(lambda: h_hot @ pk.down_t[:pk.n_hot], 20),
             "cold kernel": cuda_time(lambda: launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out,
                                                                        c_start=pk.n_hot, init=hot, lists=lists), 20)}
    return {"inside_block_ms": inside, "inside_block_total_ms": sum(inside.values()), "alone_ms": alone,
            "alone_total_ms": sum(alone.values())}


def cold_cost(x, pk) -> dict:
    """The cold kernel's time split into a per-token part and a per-entry part: the kernel alone at pack's n_hot on
    activations whose cold entries are thinned to a share `keep` (a fixed random subset; 0 = the scan with nothing
    to gather), with and without `init`, and with nothing listed (c_start = width: init, zeros and the store only).
    A line through the keep points gives ms per cold entry per token (slope) and the fixed part (intercept).
    The kernel scans act here (no lists): session 14 measured the scan's share this way before moving it out."""
    act = x @ pk.gate.T
    hot = hot_part(x, act, pk.up, pk.down_t, pk.n_hot)
    out = torch.empty_like(x)
    gen = torch.Generator(device=x.device).manual_seed(7)
    draw = torch.rand(act.shape, device=x.device, generator=gen)
    cold_on = (act[:, pk.n_hot:] > 0).sum(1).double().mean().item()
    res: dict = {"cold_nnz_mean": cold_on, "points": []}

    def time_kernel(a, c_start, init):
        return cuda_time(lambda: launchers.launch_relu_ffn(x, a, pk.up, pk.down_t, out, c_start=c_start, init=init), 20)

    for keep in (1.0, 0.5, 0.25, 0.0):
        a = act.clone()
        a[:, pk.n_hot:] = torch.where(draw[:, pk.n_hot:] < keep, a[:, pk.n_hot:], torch.zeros_like(a[:, pk.n_hot:]))
        res["points"].append({"keep": keep, "cold_nnz": cold_on * keep, "ms_init": time_kernel(a, pk.n_hot, hot),
                              "ms_no_init": time_kernel(a, pk.n_hot, None)})
        del a
    res["nothing_listed_ms_init"] = time_kernel(act, pk.width, hot)
    res["nothing_listed_ms_no_init"] = time_kernel(act, pk.width, None)
    res["copy_x_to_out_ms"] = cuda_time(lambda: out.copy_(x), 20)  # one read and one write of (M, D) bf16
    pts = res["points"]
    for key in ("ms_init", "ms_no_init"):
        xs, ys = [p["cold_nnz"] for p in pts], [p[key] for p in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
        res[f"fit_{key}"] = {"ms_per_entry_per_token": slope, "fixed_ms": my - slope * mx}
    return res


def main() -> None:
    pairs = shapes("HOT_TUNE_SHAPES", [(m, nnz) for m in PREFILL_M for nnz in PREFILL_NNZ])
    run_rows(sys.argv[1], "prefill", pairs, row, rounds=ROUNDS)


if __name__ == "__main__":
    main()
