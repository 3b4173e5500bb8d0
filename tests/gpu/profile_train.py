"""Training FFN fwd+bwd on the GPU: dense torch bf16 autograd vs the sparse CUDA op, with a per-kernel breakdown.

    python3 tests/gpu/profile_train.py [--out DIR] [--m 16384]
Prints one line per row and writes train_profile.json to DIR: ms (median of CUDA-event timings), peak memory of
one fwd+bwd, and the GPU time per kernel name of one sparse fwd+bwd (torch.profiler), for several hot-neuron
rates. The steps, timing, memory and ELL width are the train suite's (`sparsify bench --suite train`, the
user-facing benchmark); this tool adds the per-kernel and host-side breakdowns behind BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparsify_cli.bench.ffn import cuda_time
from sparsify_cli.bench.measure import kernel_ms, peak_mb
from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.bench.train_ffn import dense_step, sparse_step
from sparsify_cli.kernels.train_cuda import HotSet, hot_mask
from sparsify_cli.kernels.train_reference import sparse_ffn_train
from sparsify_cli.train.ffn_kernels import ell_width

DEV = torch.device("cuda")


def breakdown(fn):
    fn()  # warm
    per = kernel_ms(fn, name_len=60)
    top = dict(list(per.items())[:14])
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
        inp = make_ffn_inputs(args.m, d, h, nnz, device=DEV, seed=1)
        leaves = [t.detach().clone().requires_grad_(True) for t in (inp.x, inp.gate, inp.up, inp.down)]
        gy = torch.randn_like(inp.x) / args.m  # ∂(token-mean loss)/∂out, as the train suite
        lam = torch.tensor(2e-5, device=DEV)  # the paper's λ
        with torch.no_grad():
            cnt = (inp.x @ inp.gate.T > 0).sum(1).float()  # active neurons per token
            w = ell_width(cnt.mean().item())
            counts = sparse_ffn_train(*(t.detach() for t in leaves), width=w, backend="cuda").neuron_counts
        # without a hot set, and with the hot sets of two rates, as a training layer passes them (HotSet)
        variants = [(None, 0.0, "none")]
        for r in (0.005, 0.01):
            variants.append((HotSet.from_mask_host(hot_mask(counts, args.m, r).cpu(), DEV), r, "hotset"))
        for hot, rate, hint in variants:
            def sp(hot=hot):
                return sparse_step(*leaves, gy, lam, w, "cuda", hot)

            def de():
                return dense_step(*leaves, gy, lam)

            n_hot = 0 if hot is None else hot.n
            row = {"m": args.m, "nnz_target": nnz, "hot_rate": rate, "hot_hint": hint, "n_hot": n_hot,
                   "nnz_mean": cnt.mean().item(), "nnz_p99": cnt.quantile(0.99).item(), "nnz_max": cnt.max().item(),
                   "width": w, "tail_rows": int((cnt > w).sum()),
                   "dense_ms": cuda_time(de, reps=10, warmup=3), "sparse_ms": cuda_time(sp, reps=10, warmup=3),
                   "dense_peak_mb": peak_mb(de, DEV), "sparse_peak_mb": peak_mb(sp, DEV)}
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
