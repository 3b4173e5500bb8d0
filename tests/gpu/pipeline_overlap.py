"""Tried and not kept (BENCHMARKS.md, session 8): overlap the gate GEMM of token chunk i + 1 with the hybrid
sparse tail of chunk i on two streams, with and without an SM carve-out for cuBLAS
(torch._C._set_sm_carveout_experimental), on cuBLAS and cuBLASLt (development tool, nnz 29, M = 65536 and 16384).

    python3 tests/gpu/pipeline_overlap.py OUT.json
"""

import json
import sys

import torch

from sparsify_cli.bench.ffn import D_MODEL, HIDDEN, _rel, cuda_time, dense_block
from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels.ffn import hot_first_order, hybrid_ffn

res = []
for m in (65536, 16384):
    inp = make_ffn_inputs(m, D_MODEL, HIDDEN, 29, device="cuda", seed=29 + m)
    x, gate, up, down = inp.x, inp.gate, inp.up, inp.down
    act = x @ gate.T
    rates = (act[:8192] > 0).float().mean(0)
    perm, n_hot = hot_first_order(rates)
    del act
    gp, upp, dtp = gate[perm].contiguous(), up[perm].contiguous(), down.T[perm].contiguous()
    ref = hybrid_ffn(x, x @ gp.T, upp, dtp, n_hot)
    a_full = x @ gp.T
    row = {"M": m, "n_hot": n_hot}
    row["dense"] = cuda_time(lambda: dense_block(x, gate, up, down), 20)
    row["hybrid"] = cuda_time(lambda: hybrid_ffn(x, x @ gp.T, upp, dtp, n_hot), 20)
    row["tail_only"] = cuda_time(lambda: hybrid_ffn(x, a_full, upp, dtp, n_hot), 20)
    del a_full
    sa, sb = torch.cuda.Stream(), torch.cuda.Stream()

    def pipelined(chunks):
        def run():
            cur = torch.cuda.current_stream()
            sa.wait_stream(cur); sb.wait_stream(cur)
            n = m // chunks
            outs = []
            for i in range(chunks):
                xi = x[i * n:(i + 1) * n]
                with torch.cuda.stream(sa):
                    ai = xi @ gp.T
                    ev = torch.cuda.Event(); ev.record(sa)
                with torch.cuda.stream(sb):
                    sb.wait_event(ev)
                    outs.append(hybrid_ffn(xi, ai, upp, dtp, n_hot))
                    ai.record_stream(sb)
            cur.wait_stream(sa); cur.wait_stream(sb)
            return outs
        return run

    for backend in ("default", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(backend)
        for k in (0, 16, 32, 48):
            torch._C._set_sm_carveout_experimental(k if k else None)
            g = cuda_time(lambda: x @ gp.T, 20)
            h = cuda_time(lambda: hybrid_ffn(x, x @ gp.T, upp, dtp, n_hot), 20)
            pip = {c: cuda_time(pipelined(c), 20) for c in (2, 4, 8)}
            out = torch.cat(pipelined(4)())
            err = _rel(out, ref.float())
            r = dict(backend=backend, carveout=k, gate=g, hybrid=h, pipelined=pip, rel_diff_vs_hybrid=err)
            row.setdefault("runs", []).append(r)
            print(m, backend, k, f"gate {g:.3f} hybrid {h:.3f} pipelined", {c: round(v, 3) for c, v in pip.items()},
                  f"dense {row['dense']:.3f} tail {row['tail_only']:.3f} diff {err:.1e}", flush=True)
        torch._C._set_sm_carveout_experimental(None)
    torch.backends.cuda.preferred_blas_library("default")
    res.append(row)
    del inp, x, gate, up, down, gp, upp, dtp, ref
    torch.cuda.empty_cache()
json.dump(res, open(sys.argv[1], "w"), indent=1)
