"""Dense vs sparse gated FFN on the CPU: the suite behind `sparsify bench --suite cpu`, and a detailed table of
the pure-torch methods: `python -m sparsify_cli.bench.cpu [--m 1 64] [--nnz 29 56]`.

Inputs from bench/synthetic.make_ffn_inputs (PERFORMANCE.md's recipe) in fp32, D = 2048, H = 5632 by default.
dense  = three F.linear calls; sparse = sparse_ffn_forward (dense gate, then only active rows of U and Downᵀ);
twell  = pack_twell of the gate + twell_ffn_forward (includes the packing). Medians of interleaved timings after
warm-up; every timed output is checked against the dense one in the same run.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from sparsify_cli.bench.measure import compare, cpu_median_ms, nnz_stats, rel_err
from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.formats.sparse_ffn import dense_ffn_forward, down_rows, sparse_ffn_forward, twell_ffn_forward
from sparsify_cli.formats.twell import pack_twell


def _inputs(tokens: int, d_model: int, d_ffn: int, nnz: float, seed: int):
    return make_ffn_inputs(tokens, d_model, d_ffn, nnz, seed=seed, dtype=torch.float32)


def suite_cases(settings) -> list[tuple[str, int, float]]:
    """(kind, tokens, nnz) of every row: decode (batch 1…) and prefill, per density."""
    return [(kind, m, nnz) for nnz in settings.nnz
            for kind, ms in (("decode", settings.decode), ("prefill", settings.tokens)) for m in ms]


def suite_row(settings, kind: str, m: int, nnz: float) -> dict:
    """One row of the CPU suite: fresh inputs, sparse_ffn_forward (auto) against the dense FFN."""
    inp = _inputs(m, settings.d_model, settings.d_ffn, nnz, settings.seed + int(nnz))
    x, gate_w, up_w, down_w = inp.x, inp.gate, inp.up, inp.down
    down_t = down_rows(down_w)  # offline layout (pack time), not timed
    row = {"kind": kind, "M": m, "D": settings.d_model, "H": settings.d_ffn, "nnz_target": nnz,
           **nnz_stats(F.linear(x, gate_w))}
    with torch.inference_mode():
        row.update(compare(
            lambda: dense_ffn_forward(x, gate_w, up_w, down_w),
            lambda: sparse_ffn_forward(x, gate_w, up_w, down_t),
            device=torch.device("cpu"), tokens=m, reps=settings.reps, warmup=settings.warmup,
        ))
    row["sparse_path"] = "formats.sparse_ffn_forward (auto), fp32"
    return row


# ---- the detailed table of the pure-torch methods (python -m sparsify_cli.bench.cpu) -----------------------------


def run(ms: list[int], nnzs: list[float], d_model: int, n_cols: int, reps: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for nnz in nnzs:
        # One weight set per density, the largest M; smaller M take its first rows.
        inp = _inputs(max(ms), d_model, n_cols, nnz, seed=0)
        gate_w, up_w, down_w = inp.gate, inp.up, inp.down
        down_t = down_rows(down_w)
        for m in ms:
            x = inp.x[:m].contiguous()
            gate = torch.relu(x @ gate_w.T)  # (M, H)
            per_tok = (gate != 0).sum(dim=1).float()
            with torch.inference_mode():
                ref = dense_ffn_forward(x, gate_w, up_w, down_w)

                def twell_path():
                    tw = pack_twell(torch.relu(F.linear(x, gate_w)))
                    return twell_ffn_forward(x, tw, up_w, down_t, gate_w=gate_w)

                fns: dict[str, Callable] = dict(
                    dense=lambda: dense_ffn_forward(x, gate_w, up_w, down_w),
                    gate=lambda: F.linear(x, gate_w),
                    sparse=lambda: sparse_ffn_forward(x, gate_w, up_w, down_t),
                    pairs=lambda: sparse_ffn_forward(x, gate_w, up_w, down_t, method="pairs"),
                    union=lambda: sparse_ffn_forward(x, gate_w, up_w, down_t, method="union"),
                    twell=twell_path,
                )
                err_s, err_t = rel_err(fns["sparse"](), ref), rel_err(twell_path(), ref)
                t = cpu_median_ms(fns, reps)
            rows.append(dict(
                threads=threads, M=m, nnz_mean=float(per_tok.mean()), nnz_max=int(per_tok.max()),
                union=int((gate != 0).any(dim=0).sum()), dense=t["dense"], gate=t["gate"], sparse=t["sparse"],
                pairs=t["pairs"], union_ms=t["union"], twell=t["twell"], err_sparse=err_s, err_twell=err_t,
            ))
    return rows


def main(argv: Optional[list[str]] = None) -> None:
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
    rows = [r for th in dict.fromkeys(args.threads)
            for r in run(args.m, args.nnz, args.d_model, args.d_ffn, args.reps, th)]
    print(f"gated FFN fp32, D={args.d_model}, H={args.d_ffn}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, medians of {args.reps} reps (ms)")
    head = ("threads", "M", "nnz mean/max", "|J|", "dense", "gate only", "sparse(auto)", "pairs", "union",
            "twell+pack", "speed-up", "rel err")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([
            f"{r['threads']}", f"{r['M']}", f"{r['nnz_mean']:.1f}/{r['nnz_max']}", f"{r['union']}",
            f"{r['dense']:.3f}", f"{r['gate']:.3f}", f"{r['sparse']:.3f}", f"{r['pairs']:.3f}", f"{r['union_ms']:.3f}",
            f"{r['twell']:.3f}", f"{r['dense'] / r['sparse']:.2f}x", f"{r['err_sparse']:.1e}/{r['err_twell']:.1e}",
        ]))


if __name__ == "__main__":
    main()
