"""Is torch's gate GEMM (x·Gᵀ through cuBLAS) the fastest cuBLAS offers at our shapes? (development tool)

The gate GEMM is about half of the packed prefill block (1.35-1.42 of ~2.8 ms at 65536 tokens) and 7.4-7.9 µs of the
~21 µs decode path at 17-64 tokens, where 2x needs ~17 µs. This tool asks cuBLASLt (ctypes) for its heuristic's
algorithms for the same GEMM (bf16 in and out, fp32 accumulate, no epilogue), adds split-K variants of each that
cublasLtMatmulAlgoCheck accepts, and times every one against torch's ``x @ gate.T``:
  decode (M = 16, 17, 32, 64): a CUDA graph over 8 layers' packed gates (8 x 16 MB, so the weights come from HBM),
    median of 100 replays, best of ROUNDS interleaved rounds, µs per layer;
  prefill (M = 16384, 65536): CUDA events, median of 20 calls, best of ROUNDS rounds, ms.
Each algorithm's output is compared with torch's (max abs difference; 0 = the same bits).

    python3 tests/gpu/lt_gate_algos.py OUT.json          # LT_DECODE_M=16,17,32,64 LT_PREFILL_M=16384,65536
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import sys

import torch

from sparsify_cli.bench.ffn import (CALIB_TOKENS, calib_tokens, cuda_time, decode_layers, dense_block, environment,
                                    graph_replay, packed_layer)
from prefill_rows import packed_inputs

ROUNDS = int(os.environ.get("LT_ROUNDS", "3"))
DECODE_M = [int(v) for v in os.environ.get("LT_DECODE_M", "").split(",") if v]
PREFILL_M = [int(v) for v in os.environ.get("LT_PREFILL_M", "16384,65536").split(",") if v]
MAX_ALGOS = 32
SPLITS = (2, 4, 8, 16)

# cublasLt.h enums (stable ABI)
CUDA_R_32F, CUDA_R_16BF, CUBLAS_COMPUTE_32F = 0, 14, 68
OP_N, OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB = 3, 4
PREF_MAX_WORKSPACE_BYTES = 1
CONFIG_NAMES = ("id", "tile", "splitk", "reduction", "swizzle", "custom", "stages", "inner", "cluster")
CFG_SPLITK, CFG_REDUCTION = 2, 3
REDUCTION_COMPUTE_TYPE = 2
WORKSPACE_BYTES = 64 << 20


class _Result(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _library() -> ctypes.CDLL:
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # torch loads its cuBLASLt first
    names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    try:
        import nvidia

        names += [p for base in nvidia.__path__ for p in sorted(glob.glob(f"{base}/*/lib/libcublasLt.so*"))]
    except ImportError:
        pass
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("libcublasLt not found")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: cublasStatus {status}")


class LtGemm:
    """out (M, N) = x (M, K) · w through cuBLASLt for one shape, w (N, K) (``kn`` False: x·wᵀ, nn.Linear's layout)
    or (K, N) (``kn`` True: x·w). cuBLAS is column-major: out is C (N x M), x is B (K x M), w is A: (K x N)
    transposed, or (N x K)."""

    def __init__(self, m: int, k: int, n: int, kn: bool = False):
        lib = self.lib = _library()
        vp = ctypes.c_void_p
        self.handle, self.desc = vp(), vp()
        _check(lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "DescCreate")
        for attr, v in ((DESC_TRANSA, OP_N if kn else OP_T), (DESC_TRANSB, OP_N)):
            val = ctypes.c_int32(v)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(val), ctypes.c_size_t(4)),
                   "DescSetAttribute")
        self.a = self._layout(n, k, n) if kn else self._layout(k, n, k)
        self.b, self.c = self._layout(k, m, k), self._layout(n, m, n)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device="cuda")

    def _layout(self, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        out = ctypes.c_void_p()
        _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(out), CUDA_R_16BF, ctypes.c_uint64(rows),
                                                   ctypes.c_uint64(cols), ctypes.c_int64(ld)), "LayoutCreate")
        return out

    def heuristic(self, n: int = MAX_ALGOS) -> list[_Result]:
        pref = ctypes.c_void_p()
        _check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        ws = ctypes.c_uint64(WORKSPACE_BYTES)
        _check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws),
                                                             ctypes.c_size_t(8)), "PreferenceSetAttribute")
        results = (_Result * n)()
        count = ctypes.c_int(0)
        _check(self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.c, self.c, pref,
                                                       n, results, ctypes.byref(count)), "AlgoGetHeuristic")
        return [results[i] for i in range(count.value)]

    def config(self, r: _Result) -> dict:
        out = {}
        get = self.lib.cublasLtMatmulAlgoConfigGetAttribute
        for attr, name in enumerate(CONFIG_NAMES):
            size = ctypes.c_size_t(0)  # the attribute's size first: the call wants it exactly
            if get(ctypes.byref(r.algo), attr, None, ctypes.c_size_t(0), ctypes.byref(size)) != 0 or not size.value:
                continue
            buf, written = ctypes.c_uint64(0), ctypes.c_size_t(0)
            if get(ctypes.byref(r.algo), attr, ctypes.byref(buf), size, ctypes.byref(written)) == 0:
                out[name] = int(buf.value)
        return out

    def with_splitk(self, r: _Result, split: int) -> _Result | None:
        """A copy of r with split-K ``split`` (reduction in fp32), if cublasLtMatmulAlgoCheck accepts it."""
        c = _Result()
        ctypes.memmove(ctypes.byref(c), ctypes.byref(r), ctypes.sizeof(_Result))
        for attr, val in ((CFG_SPLITK, ctypes.c_uint32(split)), (CFG_REDUCTION, ctypes.c_uint32(REDUCTION_COMPUTE_TYPE))):
            if self.lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(c.algo), attr, ctypes.byref(val),
                                                             ctypes.c_size_t(4)) != 0:
                return None
        checked = _Result()
        if self.lib.cublasLtMatmulAlgoCheck(self.handle, self.desc, self.a, self.b, self.c, self.c,
                                            ctypes.byref(c.algo), ctypes.byref(checked)) != 0:
            return None
        if checked.workspace_size > WORKSPACE_BYTES:
            return None
        c.workspace_size = checked.workspace_size
        return c

    def __call__(self, r: _Result, x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
        vp = ctypes.c_void_p
        _check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), vp(w.data_ptr()), self.a, vp(x.data_ptr()), self.b,
            ctypes.byref(self.beta), vp(out.data_ptr()), self.c, vp(out.data_ptr()), self.c, ctypes.byref(r.algo),
            vp(self.workspace.data_ptr()), ctypes.c_size_t(WORKSPACE_BYTES),
            vp(torch.cuda.current_stream().cuda_stream)), "cublasLtMatmul")


def candidates(lt: LtGemm) -> list[tuple[str, _Result, dict]]:
    """The heuristic's algorithms and their accepted split-K variants, named h<i> and h<i>/k<split>."""
    out = []
    for i, r in enumerate(lt.heuristic()):
        cfg = lt.config(r)
        out.append((f"h{i}", r, cfg))
        if cfg.get("splitk", 1) <= 1:
            for s in SPLITS:
                v = lt.with_splitk(r, s)
                if v is not None:
                    out.append((f"h{i}/k{s}", v, lt.config(v)))
    return out


def time_rows(fns: dict, timer, rounds: int) -> dict[str, float]:
    res: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            try:
                res[k].append(timer(f))
            except RuntimeError as e:  # an algorithm the GPU refuses at run time
                res[k].append(float("nan"))
                print(f"  {k}: {e}", flush=True)
    return {k: min(v) for k, v in res.items()}


def decode_row(m: int) -> dict:
    n_layers, reps = 8, 100
    sets, downs_t = decode_layers(m, n_layers, 500)
    x = sets[0].x
    calib = calib_tokens(CALIB_TOKENS, 7)
    gates = [packed_layer(s.gate, s.up, dt, calib).gate for s, dt in zip(sets, downs_t)]
    del calib
    lt = LtGemm(m, x.shape[1], gates[0].shape[0])
    outs = [torch.empty(m, g.shape[0], dtype=torch.bfloat16, device="cuda") for g in gates]
    ref = [x @ g.T for g in gates]
    cands = candidates(lt)
    fns, diffs, cfgs = {"torch": graph_replay(lambda: [x @ g.T for g in gates])}, {}, {}
    for name, r, cfg in cands:
        try:
            fns[name] = graph_replay(lambda r=r: [lt(r, x, g, o) for g, o in zip(gates, outs)])
        except RuntimeError as e:
            print(f"  {name}: {e}", flush=True)
            continue
        diffs[name] = max((o.float() - rf.float()).abs().max().item() for o, rf in zip(outs, ref))
        cfgs[name] = cfg
    us = time_rows(fns, lambda f: cuda_time(f, reps) / n_layers * 1e3, ROUNDS)
    return {"kind": "decode", "M": m, "width": gates[0].shape[0], "us": us, "max_abs_diff": diffs, "config": cfgs}


def prefill_gemms(x, inp, pk) -> dict[str, tuple]:
    """The prefill block's GEMMs as (K, N, kn, x operand, weight): the packed hybrid's three and dense's two."""
    m, n_hot = x.shape[0], pk.n_hot
    h_hot = torch.randn(m, n_hot, device="cuda").to(torch.bfloat16)
    h = torch.randn(m, inp.gate.shape[0], device="cuda").to(torch.bfloat16)
    return {"gate (packed)": (x, pk.gate, False), "hot up": (x, pk.up[:n_hot], False),
            "hot down": (h_hot, pk.down_t[:n_hot], True), "dense gate/up": (x, inp.gate, False),
            "dense down": (h, inp.down, False)}


def _torch_mm(a, w, kn):
    return a @ w if kn else a @ w.T


def _lt_mm(lt, r, a, w, kn):
    out = torch.empty(a.shape[0], w.shape[1] if kn else w.shape[0], dtype=torch.bfloat16, device="cuda")
    lt(r, a, w, out)
    return out


def _graph_of(fn, calls: int):
    """fn captured ``calls`` times in one CUDA graph: its replay, and the ms per call of one replay."""
    replay = graph_replay(lambda: [fn() for _ in range(calls)])
    return lambda: cuda_time(replay, 10) / calls


def prefill_row(m: int) -> dict:
    from sparsify_cli.kernels import ffn_forward, launchers

    inp, pk = packed_inputs(m, 29)
    x = inp.x
    calls = 10 if m <= 16384 else 4  # GEMMs per graph (each graph keeps its outputs)
    gemm_ms, diffs, cfgs, best = {}, {}, {}, {}
    for gname, (a, w, kn) in prefill_gemms(x, inp, pk).items():
        n, k = (w.shape[1], w.shape[0]) if kn else w.shape
        lt = LtGemm(m, k, n, kn)
        ref = _torch_mm(a, w, kn)
        timers, found = {"torch": _graph_of(lambda: _torch_mm(a, w, kn), calls)}, {}
        for name, r, cfg in candidates(lt):
            if "/k" in name:
                continue  # split-K does not pay where the output already fills the GPU many times over
            try:
                d = (_lt_mm(lt, r, a, w, kn).float() - ref.float()).abs().max().item()
                timers[name] = _graph_of(lambda r=r: _lt_mm(lt, r, a, w, kn), calls)
            except RuntimeError as e:
                print(f"  {gname} {name}: {e}", flush=True)
                continue
            found[name] = r
            diffs[f"{gname} {name}"], cfgs[f"{gname} {name}"] = d, cfg
        t = time_rows(timers, lambda f: f(), ROUNDS)
        gemm_ms[gname] = t
        b = min(t, key=t.get)
        best[gname] = (b, lt, found.get(b))
        print(f"prefill M={m} {gname}: torch {t['torch']:.4f} ms, best {b} {t[b]:.4f} ms "
              f"(diff {diffs.get(f'{gname} {b}', 0.0)}, cfg {cfgs.get(f'{gname} {b}')})", flush=True)
    del ref

    def mm(gname, a, w, kn):
        b, lt, r = best[gname]
        return _torch_mm(a, w, kn) if r is None else _lt_mm(lt, r, a, w, kn)

    def lt_block():
        """The default hybrid (hot first, listed) with each GEMM by its fastest algorithm above."""
        act = mm("gate (packed)", x, pk.gate, False)
        u = mm("hot up", x, pk.up[:pk.n_hot], False)
        h_hot = torch.empty_like(u)
        lists = torch.empty(m, launchers.LIST_SLOTS, dtype=torch.int32, device="cuda")
        launchers.launch_relu_list(act, pk.n_hot, u, h_hot, lists)
        out = torch.empty_like(x)
        launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot,
                                  init=mm("hot down", h_hot, pk.down_t[:pk.n_hot], True), lists=lists)
        return out

    default = lambda: ffn_forward(x, pk.gate, pk.up, pk.down_t, kernels="cuda", mode="sparse", n_hot=pk.n_hot)
    same = torch.equal(default(), lt_block())
    blocks = {"dense": _graph_of(lambda: dense_block(x, inp.gate, inp.up, inp.down), 2),
              "default block": _graph_of(default, 2), "block, fastest GEMMs": _graph_of(lt_block, 2)}
    block_ms = time_rows(blocks, lambda f: f(), max(ROUNDS, 5))
    print(f"prefill M={m} blocks: " + ", ".join(f"{k} {v:.4f}" for k, v in block_ms.items()) + f"; same bits {same}",
          flush=True)
    return {"kind": "prefill", "M": m, "n_hot": pk.n_hot, "width": pk.width, "gemm_ms": gemm_ms,
            "max_abs_diff": diffs, "config": cfgs, "block_ms": block_ms, "block_same_bits": same,
            "fastest": {g: b for g, (b, _, _) in best.items()}}


def main() -> None:
    path = sys.argv[1]
    rows = []
    for m in DECODE_M:
        rows.append(decode_row(m))
    for m in PREFILL_M:
        rows.append(prefill_row(m))
    for r in rows:
        if r["kind"] != "decode":
            continue
        t = r["us"]
        best = min((k for k in t if k != "torch" and t[k] == t[k]), key=t.get, default=None)
        print(f"{r['kind']} M={r['M']} width={r['width']}: torch {t['torch']:.4g}, best {best} {t.get(best, 0):.4g} "
              f"({len(t) - 1} algorithms; diff {r['max_abs_diff'].get(best)}; cfg {r['config'].get(best)})", flush=True)
        torch.cuda.empty_cache()
    with open(path, "w") as f:
        json.dump({"environment": environment(), "rounds": ROUNDS, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
