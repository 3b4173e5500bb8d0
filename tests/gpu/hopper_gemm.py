"""kernels_cu/gemm_sm90.cu (a TMA + wgmma GEMM, the groundwork for a gate GEMM that lists from its epilogue)
against torch's x @ w.T (cuBLAS): correctness on fresh random inputs, then time (development tool, H100/H200).

Correctness: each shape's output (poisoned with NaN first) against the fp32 product; its error must stay within
1.5x torch bf16's own, and the share of entries equal to torch's bits is reported. Time: CUDA-graph replays
(GEMM_CALLS calls per graph), best of ROUNDS interleaved rounds, ms and TFLOP/s per shape, for each build
(HOPPER_GEMM_BUILDS: stages x cluster size x K columns per stage x early
release x TMA-store epilogue; a cluster's blocks share the w slice by TMA
multicast).

    python3 tests/gpu/hopper_gemm.py OUT.json      # nvcc on PATH; HOPPER_GEMM_ROUNDS=3 HOPPER_GEMM_BUILDS=4x1x64,8x1x32
    HOPPER_GEMM_DIAG=4x2x64x0+GEMM_DIAG_NO_STORE: diagnosis builds, timed beside the others, not checked
    HOPPER_GEMM_PROFILE=1: one launch of each build and of torch's GEMM (16384 x 3968 x 2048), for ncu
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from sparsify_cli.bench.ffn import cuda_time, environment, graph_replay
from sparsify_cli.kernels import loader
from sparsify_cli.resources import resource_dir

BM, BN = 128, 256
ROUNDS = int(os.environ.get("HOPPER_GEMM_ROUNDS", "3"))
# stages x cluster x BK x early release (0/1) x TMA-store epilogue (0/1)
BUILDS = [tuple(int(p) for p in v.split("x")) for v in
          os.environ.get("HOPPER_GEMM_BUILDS", "3x2x64x0x1,4x2x64x0x0").split(",")]
# diagnosis builds, timed only (their outputs are not checked): the same spec + GEMM_DIAG_* defines
DIAG = [(tuple(int(p) for p in v.split("+")[0].split("x")), tuple(v.split("+")[1:]))
        for v in os.environ.get("HOPPER_GEMM_DIAG", "").split(",") if v]
CHECK_SHAPES = [(128, 256, 64), (300, 520, 200), (777, 1000, 1000), (129, 8, 64), (1000, 3968, 2048), (4096, 5632, 2048),
                (65536, 3968, 2048)]
TIME_SHAPES = [(16384, 3968, 2048), (65536, 3968, 2048), (65536, 4480, 2048), (65536, 5632, 2048)]

# cuda.h enums
BF16, L2_PROMOTION_256B = 9, 3
SWIZZLE = {64: 2, 128: 3}  # CU_TENSOR_MAP_SWIZZLE_64B / _128B by row bytes
CLUSTER_DIMENSION = 4  # CUlaunchAttributeID


class HopperGemm:
    """One build of gemm_bf16_tn_kernel (nvcc, sm_90a), launched through cuLaunchKernelEx with its TMA maps."""

    def __init__(self, stages: int, cluster: int, bk: int = 64, early: int = 0, store: int = 1,
                 diag: tuple[str, ...] = ()):
        import cupy

        self.stages, self.cluster, self.bk, self.early, self.store = stages, cluster, bk, early, store
        src = resource_dir("kernels_cu") / "gemm_sm90.cu"
        cubin = Path(tempfile.mkdtemp()) / f"gemm_s{stages}_c{cluster}_k{bk}_e{early}_t{store}.cubin"
        subprocess.run(["nvcc", "-std=c++17", "-cubin", "-arch=sm_90a", f"-DGEMM_STAGES={stages}",
                        f"-DGEMM_CLUSTER={cluster}", f"-DGEMM_BK={bk}", f"-DGEMM_EARLY_RELEASE={early}",
                        f"-DGEMM_TMA_STORE={store}", *(f"-D{d}" for d in diag), "-o", str(cubin), str(src)], check=True)
        self.module = cupy.RawModule(path=str(cubin))
        self.fn = self.module.get_function("gemm_bf16_tn_kernel")
        self.smem = stages * (BM + BN) * bk * 2 + (64 << 10 if store else 0) + 1024 + 2 * stages * 8 + 64
        self.fn.max_dynamic_shared_size_bytes = self.smem
        lib = self.lib = loader._driver()
        lib.cuTensorMapEncodeTiled.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                                               ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                                               ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                                               ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
        self._maps: dict = {}

    def _map(self, t: torch.Tensor, box_rows: int, box_cols: int | None = None):
        box_cols = self.bk if box_cols is None else box_cols
        key = (t.data_ptr(), tuple(t.shape), box_rows, box_cols)
        if key not in self._maps:
            desc = (ctypes.c_uint64 * 16)()
            rows, k = t.shape
            rc = self.lib.cuTensorMapEncodeTiled(
                desc, BF16, 2, ctypes.c_void_p(t.data_ptr()), (ctypes.c_uint64 * 2)(k, rows),
                (ctypes.c_uint64 * 1)(t.stride(0) * 2), (ctypes.c_uint32 * 2)(box_cols, box_rows),
                (ctypes.c_uint32 * 2)(1, 1), 0, SWIZZLE[2 * box_cols], L2_PROMOTION_256B, 0)
            if rc != 0:
                raise RuntimeError(f"cuTensorMapEncodeTiled failed: CUresult {rc}")
            self._maps[key] = (desc, t)  # the tensor is kept alive with its map
        return self._maps[key][0]

    def __call__(self, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        m, k = x.shape
        n = w.shape[0]
        assert x.is_contiguous() and w.is_contiguous() and k % 8 == 0 and n % 8 == 0  # TMA: 16-byte row strides
        if out is None:
            out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
        args = [self._map(x, BM), self._map(w, BN // self.cluster), self._map(out, 64, 64), ctypes.c_uint64(out.data_ptr()),
                ctypes.c_int32(m), ctypes.c_int32(n), ctypes.c_int32(k)]
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        # persistent: at most one block per SM, in whole clusters (kernels_cu/gemm_sm90.cu)
        work = -(-(-(-m // BM)) // self.cluster) * -(-n // BN)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        grid = min(work, sms // self.cluster) * self.cluster
        attr = loader._LaunchAttr(id=CLUSTER_DIMENSION)
        dims = (ctypes.c_uint * 3)(self.cluster, 1, 1)
        ctypes.memmove(ctypes.addressof(attr.value), dims, ctypes.sizeof(dims))
        cfg = loader._LaunchConfig((ctypes.c_uint * 3)(grid, 1, 1), (ctypes.c_uint * 3)(384, 1, 1),
                                   self.smem, torch.cuda.current_stream().cuda_stream,
                                   ctypes.pointer(attr) if self.cluster > 1 else None, 1 if self.cluster > 1 else 0)
        rc = self.lib.cuLaunchKernelEx(ctypes.byref(cfg), self.fn.kernel.ptr, params, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernelEx failed: CUresult {rc}")
        return out


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
    return {"M": m, "N": n, "K": k, "stages": g.stages, "cluster": g.cluster, "bk": g.bk, "early": g.early, "store": g.store, "max_err": err, "max_err_torch": err_torch,
            "same_bits_as_torch": same, "ok": ok}


def profile_once(builds: dict) -> None:
    """One launch of each build and one of torch's at 16384 x 3968 x 2048, for Nsight Compute."""
    x = torch.randn(16384, 2048, device="cuda").to(torch.bfloat16)
    w = (torch.randn(3968, 2048, device="cuda") / 2048 ** 0.5).to(torch.bfloat16)
    for g in builds.values():
        g(x, w)
    x @ w.T
    torch.cuda.synchronize()


def main() -> None:
    path = sys.argv[1]
    builds = {b: HopperGemm(*b) for b in BUILDS}
    diag = {(b, defs): HopperGemm(*b, diag=defs) for b, defs in DIAG}
    if os.environ.get("HOPPER_GEMM_PROFILE"):
        profile_once(builds)
        return
    checks = [check(g, *shape) for g in builds.values() for shape in CHECK_SHAPES]
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
            for s, g in builds.items():
                fns["x".join(map(str, s))] = graph_replay(lambda g=g: [g(x, w, o) for o in outs])
            for (s, defs), g in diag.items():
                fns["+".join(["x".join(map(str, s)), *defs])] = graph_replay(lambda g=g: [g(x, w, o) for o in outs])
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
