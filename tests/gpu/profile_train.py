"""Training FFN fwd+bwd on the GPU: dense torch bf16 autograd vs the sparse CUDA op, with a per-kernel breakdown.

    python3 tests/gpu/profile_train.py [--out DIR] [--m 16384]
Prints one line per row and writes train_profile.json to DIR: ms (median of CUDA-event timings), peak memory of
one fwd+bwd, and the GPU time per kernel name of one sparse fwd+bwd (torch.profiler). This is the development
tool behind the numbers; `sparsify bench --suite train` is the user-facing benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels.train_reference import sparse_ffn_train

LAM = 2e-5  # the paper's λ


def dense_step(x, g, u, dn, gy):
    h = F.relu(F.linear(x, g)) * F.linear(x, u)
    out = F.linear(h, dn)
    l1 = h.float().abs().sum() / x.shape[0]
    ((out * gy).sum() + LAM * l1).backward()


def sparse_step(x, g, u, dn, gy, width, hot=None):
    res = sparse_ffn_train(x, g, u, dn, width=width, backend="cuda", hot=hot)
    ((res.out * gy).sum() + LAM * res.l1).backward()
    return res


def timed(fn, reps=10, warm=3):
    for _ in range(warm):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def peak_mb(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def breakdown(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per = defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            per[ev.name[:60]] += ev.device_time_total / 1000 if hasattr(ev, "device_time_total") else 0
    top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:14])
    top["(all kernels)"] = sum(per.values())
    return top


def host_table(fn, path):
    """CPU-side cost of one call: torch.profiler's ops by self CPU time (where the host overhead goes)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    Path(path).write_text(table)
    return table


def width_for(nnz):
    return int(min(512, max(64, 32 * round(3 * nnz / 32))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_out")
    ap.add_argument("--m", type=int, default=16384)
    ap.add_argument("--nnz", default="29,56,112,225")
    ap.add_argument("--host", action="store_true", help="also write the CPU-side op table of each sparse row")
    args = ap.parse_args()
    rows = []
    d, h = 2048, 5632
    for nnz in [float(v) for v in args.nnz.split(",")]:
        inp = make_ffn_inputs(args.m, d, h, nnz, device="cuda", seed=1)
        leaves = [t.detach().clone().requires_grad_(True) for t in (inp.x, inp.gate, inp.up, inp.down)]
        gy = torch.randn_like(inp.x)
        counts = sparse_step(*leaves, gy, width_for(nnz)).neuron_counts
        from sparsify_cli.kernels.train_cuda import hot_mask

        variants = [(width_for(nnz), None, 0.0)] + [(width_for(nnz), hot_mask(counts, args.m, r), r)
                                                   for r in (0.005, 0.01)]
        for w, hot, rate in variants:
            def sp():
                for t in leaves:
                    t.grad = None
                sparse_step(*leaves, gy, w, hot)

            def de():
                for t in leaves:
                    t.grad = None
                dense_step(*leaves, gy)

            with torch.no_grad():
                a = inp.x @ inp.gate.T
                cnt = (a > 0).sum(1).float()
            row = {"m": args.m, "nnz_target": nnz, "hot_rate": rate, "n_hot": 0 if hot is None else int(hot.sum()), "nnz_mean": cnt.mean().item(), "nnz_p99": cnt.quantile(0.99).item(),
                   "nnz_max": cnt.max().item(), "width": w, "tail_rows": int((cnt > w).sum()),
                   "dense_ms": timed(de), "sparse_ms": timed(sp), "dense_peak_mb": peak_mb(de),
                   "sparse_peak_mb": peak_mb(sp)}
            row["ratio"] = row["dense_ms"] / row["sparse_ms"]
            row["sparse_kernels_ms"] = breakdown(sp)
            if args.host:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                print(host_table(sp, Path(args.out) / f"host_{nnz:g}_{rate:g}.txt")[:3000])
            if hot is None:
                row["dense_kernels_ms"] = breakdown(de)
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if not k.endswith("kernels_ms")}), flush=True)
            for k, v in row["sparse_kernels_ms"].items():
                print(f"    {v:8.3f} ms  {k}")
        del inp, leaves, gy
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_profile.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
