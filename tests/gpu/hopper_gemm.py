"""kernels_cu/gemm_sm90.cu (a TMA + wgmma GEMM, the groundwork for a gate GEMM that lists from its epilogue)
against torch's x @ w.T (cuBLAS): correctness on fresh random inputs, then time (development tool, H100/H200).

Correctness: each shape's output (poisoned with NaN first) against the fp32 product; its error must stay within
1.5x torch bf16's own, and the share of entries equal to torch's bits is reported. Time: CUDA-graph replays (a few
calls per graph), best of ROUNDS interleaved rounds, ms and TFLOP/s per shape, for each build of the kernel
(HOPPER_GEMM_BUILDS: ";"-separated builds, each ","-separated defines such as GEMM_STAGES=4, GEMM_CLUSTER=1,
GEMM_EARLY_RELEASE=1; "default" for the source's defaults), through kernels/hopper.py's build and launch.

    python3 tests/gpu/hopper_gemm.py OUT.json      # HOPPER_GEMM_ROUNDS=3 HOPPER_GEMM_BUILDS="default;GEMM_CLUSTER=1"
    HOPPER_GEMM_DIAG=GEMM_DIAG_NO_STORE: diagnosis builds (same syntax), timed beside the others, not checked
    HOPPER_GEMM_PROFILE=1: one launch of each build and of torch's GEMM (16384 x 3968 x 2048), for ncu
"""

from __future__ import annotations

import json
import os
import sys

import torch

from sparsify_cli.bench.ffn import cuda_time, environment, graph_replay
from sparsify_cli.kernels import hopper

ROUNDS = int(os.environ.get("HOPPER_GEMM_ROUNDS", "3"))


def _builds(spec: str) -> list[tuple[str, ...]]:
    return [() if b == "default" else tuple(b.split(",")) for b in spec.split(";") if b]


BUILDS = _builds(os.environ.get("HOPPER_GEMM_BUILDS", "default;GEMM_EARLY_RELEASE=1"))
DIAG = _builds(os.environ.get("HOPPER_GEMM_DIAG", ""))  # timed only: their outputs are not checked
CHECK_SHAPES = [(128, 256, 64), (300, 520, 200), (777, 1000, 1000), (129, 8, 64), (1000, 3968, 2048), (4096, 5632, 2048),
                (65536, 3968, 2048)]
TIME_SHAPES = [(16384, 3968, 2048), (65536, 3968, 2048), (65536, 4480, 2048), (65536, 5632, 2048)]


class HopperGemm:
    """One build of the kernel: hopper.matmul with its defines."""

    def __init__(self, defines: tuple[str, ...]):
        self.defines = defines
        self.name = ",".join(defines) or "default"

    def __call__(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return hopper.matmul(x, w, self.defines, out=out)


def check(g: HopperGemm, m: int, n: int, k: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(m * 7 + n * 3 + k)
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5).to(torch.bfloat16)
    ref = x.float() @ w.float().T
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    g(x, w, out)
    torch.cuda.synchronize()
    tb = x @ w.T
    scale = ref.abs().max().item()
    err = (out.float() - ref).abs().max().item() / scale
    err_torch = (tb.float() - ref).abs().max().item() / scale
    same = (out == tb).float().mean().item()
    ok = bool(torch.isfinite(out.float()).all().item()) and err <= 1.5 * err_torch + 1e-6
    return {"M": m, "N": n, "K": k, "build": g.name, "max_err": err, "max_err_torch": err_torch,
            "same_bits_as_torch": same, "ok": ok}


def profile_once(builds: dict) -> None:
    """One launch of each build and one of torch's at 16384 x 3968 x 2048, for Nsight Compute."""
    x = torch.randn(16384, 2048, device="cuda").to(torch.bfloat16)
    w = (torch.randn(3968, 2048, device="cuda") / 2048 ** 0.5).to(torch.bfloat16)
    for g in builds:
        g(x, w)
    x @ w.T
    torch.cuda.synchronize()


def main() -> None:
    path = sys.argv[1]
    builds = [HopperGemm(b) for b in BUILDS]
    diag = [HopperGemm(b) for b in DIAG]
    if os.environ.get("HOPPER_GEMM_PROFILE"):
        profile_once(builds)
        return
    checks = [check(g, *shape) for g in builds for shape in CHECK_SHAPES]
    for c in checks:
        print(json.dumps(c), flush=True)
    timings = []
    if all(c["ok"] for c in checks):
        for m, n, k in TIME_SHAPES:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(torch.bfloat16)
            calls = 4 if m > 16384 else 10
            outs = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in range(calls)]
            fns = {"torch": graph_replay(lambda: [torch.mm(x, w.T, out=o) for o in outs])}
            for g in builds + diag:
                fns[g.name] = graph_replay(lambda g=g: [g(x, w, o) for o in outs])
            rounds: dict[str, list[float]] = {kk: [] for kk in fns}
            for _ in range(ROUNDS):
                for kk, f in fns.items():
                    rounds[kk].append(cuda_time(f, 10) / calls)
            ms = {kk: min(v) for kk, v in rounds.items()}
            tflops = {kk: 2 * m * n * k / (v * 1e-3) / 1e12 for kk, v in ms.items()}
            row = {"M": m, "N": n, "K": k, "ms": ms, "tflops": tflops, "ms_rounds": rounds}
            print(json.dumps({kk: v for kk, v in row.items() if kk != "ms_rounds"}), flush=True)
            timings.append(row)
            del outs
            torch.cuda.empty_cache()
    with open(path, "w") as f:
        json.dump({"environment": environment(), "checks": checks, "timings": timings}, f, indent=1)
    if not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
