"""Dense vs sparse gated FFN on the CPU: `python -m sparsify_cli.formats.cpu_bench [--m 1 64] [--nnz 29 56]`.

Inputs from synthetic.make_ffn_inputs (PERFORMANCE.md's recipe), fp32, D = 2048, H = 5632 by default.
dense  = three F.linear calls; sparse = sparse_ffn_forward (dense gate, then only active rows of U and Downᵀ);
twell  = pack_twell of the gate + twell_ffn_forward (includes the packing). Medians of --reps timings after
warm-up; every timed output is checked against the dense one in the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sparsify_cli.formats.sparse_ffn import dense_ffn_forward, down_rows, sparse_ffn_forward, twell_ffn_forward
from sparsify_cli.formats.synthetic import make_ffn_inputs
from sparsify_cli.formats.twell import pack_twell


def _median_ms(fns: dict, reps: int, warmup: int = 2) -> dict:
    """Median ms per function; the functions take turns within each rep, so load from other processes on the
    machine hits all of them alike and the ratios stay fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _rel_err(y, ref) -> float:
    return float((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def run(ms: list[int], nnzs: list[float], d_model: int, n_cols: int, reps: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for nnz in nnzs:
        # One weight set per density, the largest M; smaller M take its first rows.
        inp = make_ffn_inputs(max(ms), d_model, n_cols, nnz, seed=0)
        down_t = down_rows(inp.down_w)
        for m in ms:
            x = inp.x[:m].contiguous()
            gate = torch.relu(x @ inp.gate_w.T)  # (M, H)
            per_tok = (gate != 0).sum(dim=1).float()
            with torch.inference_mode():
                ref = dense_ffn_forward(x, inp.gate_w, inp.up_w, inp.down_w)

                def twell_path():
                    tw = pack_twell(torch.relu(torch.nn.functional.linear(x, inp.gate_w)))
                    return twell_ffn_forward(x, tw, inp.up_w, down_t, gate_w=inp.gate_w)

                err_s = _rel_err(sparse_ffn_forward(x, inp.gate_w, inp.up_w, down_t), ref)
                err_t = _rel_err(twell_path(), ref)
                t = _median_ms(dict(
                    dense=lambda: dense_ffn_forward(x, inp.gate_w, inp.up_w, inp.down_w),
                    gate=lambda: torch.nn.functional.linear(x, inp.gate_w),
                    sparse=lambda: sparse_ffn_forward(x, inp.gate_w, inp.up_w, down_t),
                    pairs=lambda: sparse_ffn_forward(x, inp.gate_w, inp.up_w, down_t, method="pairs"),
                    union=lambda: sparse_ffn_forward(x, inp.gate_w, inp.up_w, down_t, method="union"),
                    twell=twell_path,
                ), reps)
            rows.append(dict(
                threads=threads, M=m, nnz_mean=float(per_tok.mean()), nnz_max=int(per_tok.max()),
                union=int((gate != 0).any(dim=0).sum()), dense=t["dense"], gate=t["gate"], sparse=t["sparse"],
                pairs=t["pairs"], union_ms=t["union"], twell=t["twell"], err_sparse=err_s, err_twell=err_t,
            ))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", type=int, nargs="+", default=[1, 64])
    p.add_argument("--nnz", type=float, nargs="+", default=[29.0, 56.0])
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--d-ffn", type=int, default=5632)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()],
                   help="torch intra-op threads (a busy machine punishes 2 threads on 2 cores: see FORMAT.md)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()[0]
    rows = [r for th in dict.fromkeys(args.threads) for r in run(args.m, args.nnz, args.d_model, args.d_ffn, args.reps, th)]
    print(f"gated FFN fp32, D={args.d_model}, H={args.d_ffn}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, medians of {args.reps} reps (ms)")
    head = ("threads", "M", "nnz mean/max", "|J|", "dense", "gate only", "sparse(auto)", "pairs", "union", "twell+pack",
            "speed-up", "rel err")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([
            f"{r['threads']}", f"{r['M']}", f"{r['nnz_mean']:.1f}/{r['nnz_max']}", f"{r['union']}", f"{r['dense']:.3f}",
            f"{r['gate']:.3f}", f"{r['sparse']:.3f}", f"{r['pairs']:.3f}", f"{r['union_ms']:.3f}",
            f"{r['twell']:.3f}", f"{r['dense'] / r['sparse']:.2f}x",
            f"{r['err_sparse']:.1e}/{r['err_twell']:.1e}",
        ]))


if __name__ == "__main__":
    main()
