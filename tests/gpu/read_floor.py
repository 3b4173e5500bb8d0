"""The floor under the decode gate GEMM (development tool): how long one kernel takes to read a weight matrix
from HBM once and do nothing else, against cuBLAS's gate GEMM on the same matrices at 1 and 64 tokens. Each row
is a CUDA-graph replay over 8 distinct matrices (so none is in L2), median of 50 replays, best of 3 interleaved
rounds, µs per kernel; matrices (H, 2048) bf16 for H = 1024 ... 11264 (4 ... 46 MB; 3968 is the packed layer's
width, 5632 every neuron's). The probe (read_floor.cu) runs with 1, 2 or 4 blocks of 512 threads per SM and 4, 8
or 16 loads in flight per thread, launched plainly (each read waits for the one before: what a gate GEMM pays) and
with programmatic dependent launch (the reads overlap: the bandwidth with each launch and ramp hidden). A fit
t = t0 + bytes / bw over the sizes splits each row's time into a fixed part and a rate.

    python3 tests/gpu/read_floor.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from sparsify_cli.bench.ffn import cuda_time, environment, graph_replay
from sparsify_cli.kernels import loader

D = 2048
WIDTHS = (1024, 2048, 3968, 5632, 11264)
UNROLLS = (4, 8, 16)
BLOCKS_PER_SM = (1, 2, 4)
LAYERS = 8
ROUNDS = 3


def probe_source() -> str:
    """common.cuh's text, then the probe (what NVRTC compiles; tests/kernels/test_compile.py compiles it too)."""
    return loader.read_source("common.cuh") + (Path(__file__).parent / "read_floor.cu").read_text()


def instance(unroll: int) -> str:
    return f"read_floor_kernel<{unroll}>"


def probe_module():
    import cupy

    names = tuple(instance(u) for u in UNROLLS)
    mod = cupy.RawModule(code=probe_source(), options=("-std=c++17",), name_expressions=names)
    return {u: mod.get_function(instance(u)) for u in UNROLLS}


def fit(points: list[tuple[float, float]]) -> dict:
    """Least squares t = t0 + bytes / bw over (MB, µs) points: t0 in µs, bw in TB/s."""
    mb = np.array([p[0] for p in points])
    us = np.array([p[1] for p in points])
    slope, t0 = np.polyfit(mb, us, 1)
    return {"t0_us": round(float(t0), 2), "bw_tb_s": round(float(1.0 / slope), 2)}  # MB/µs = TB/s


def main() -> None:
    out_path = sys.argv[1]
    torch.manual_seed(0)
    fns = probe_module()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    cases: dict = {}  # name: a graph replay
    sizes: dict[str, float] = {}
    alive = []  # a graph holds raw pointers: every tensor it reads must outlive it
    for h in WIDTHS:
        ws = [torch.randn(h, D, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
        alive.append(ws)
        mb = h * D * 2 / 1e6
        for m in (1, 64):
            x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
            alive.append(x)
            cases[f"cublas_m{m}_h{h}"] = graph_replay(lambda ws=ws, x=x: [x @ w.T for w in ws])
            sizes[f"cublas_m{m}_h{h}"] = mb
        for u, fn in fns.items():
            for bps in BLOCKS_PER_SM:
                for pdl in (False, True):
                    def chain(ws=ws, fn=fn, bps=bps, pdl=pdl):
                        for w in ws:
                            args = (w.data_ptr(), np.int64(w.numel() // 8), sink.data_ptr(), np.int32(pdl))
                            loader.launch(fn, (sms * bps,), (512,), args, pdl=pdl)
                    name = f"read_u{u}_b{bps}{'_pdl' if pdl else ''}_h{h}"
                    cases[name] = graph_replay(chain)
                    sizes[name] = mb
    no_read = (sink.data_ptr(), np.int64(0), sink.data_ptr(), np.int32(0))  # a probe with nothing to read
    empty = graph_replay(lambda: [loader.launch(fns[4], (sms,), (512,), no_read) for _ in range(LAYERS)])
    cases["empty_kernel"], sizes["empty_kernel"] = empty, 0.0
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, replay in cases.items():
            t = cuda_time(replay, reps=50, warmup=5) * 1000 / LAYERS
            best[name] = min(best.get(name, float("inf")), t)
    rows = {k: {"us": round(v, 2), "mb": round(sizes[k], 2), "tb_s": round(sizes[k] / v, 2) if sizes[k] else None}
            for k, v in best.items()}
    families = sorted({k.rsplit("_h", 1)[0] for k in rows if "_h" in k})
    fits = {f: fit([(rows[f"{f}_h{h}"]["mb"], rows[f"{f}_h{h}"]["us"]) for h in WIDTHS]) for f in families}
    result = {"env": environment(), "layers": LAYERS, "rounds": ROUNDS, "rows": rows, "fits": fits}
    Path(out_path).write_text(json.dumps(result, indent=1))
    print(f"empty kernel {rows['empty_kernel']['us']} us per kernel in the graph")
    for f in families:
        line = ", ".join(f"{rows[f'{f}_h{h}']['us']}" for h in WIDTHS)
        print(f"{f:22s} {line}  (us at H {WIDTHS}); fit t0 {fits[f]['t0_us']} us, {fits[f]['bw_tb_s']} TB/s")


if __name__ == "__main__":
    main()
