"""Prefill and decode of a full-width layer against the same layer as `sparsify pack` lays it out (neurons that
never fired on calibration tokens removed), with the builds of the prefill kernel (development tool).

Prefill (D=2048, H=5632, PERFORMANCE.md's inputs): dense, the gate GEMM (cuBLAS; cuBLASLt beside it), the hybrid
path on the full width and on the packed layer with every build of the sparse kernel in HINTS (cache hints and the
activation-row prefetch on and off), in interleaved rounds; the sparse kernel alone;
whether all builds give the same bits; the packed layer's error against the fp32 block and how many activations
of the timed tokens fell on removed neurons. Decode (99.5% sparsity, CUDA graphs over 8 layers): dense, the path
ffn_forward takes with a known density on the full width and on the packed layers; `rowgroup`: the fused gate
kernel's MMA_ROW_GROUP.

    python3 tests/gpu/prefill_tune.py OUT.json [prefill] [decode] [rowgroup]
    ncu --kernel-name regex:'twell_ffn_kernel' python3 tests/gpu/prefill_tune.py profile   # a launch per build
"""

from __future__ import annotations

import json
import os
import sys

import torch

from sparsify_cli.bench.ffn import (CALIB_TOKENS, D_MODEL, HIDDEN, _rel, calib_tokens, cuda_time, decode_layers,
                                    dense_block, environment, graph_replay, packed_layer)
from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels import launchers, ops
from sparsify_cli.kernels.ffn import hot_first_order, hot_part

HINTS = {  # builds of the sparse kernel (launch_relu_ffn keywords): its cache eviction hints and activation-row
    # prefetch (session 9 also timed a kernel sharing a token among 2 / 4 warps here: slower, removed; BENCHMARKS.md)
    "hints0": dict(defines=("FFN_MIN_BLOCKS=4", "FFN_STREAM_HINTS=0", "FFN_ACT_PREFETCH=0")),
    "hints1": dict(defines=("FFN_MIN_BLOCKS=4", "FFN_STREAM_HINTS=1", "FFN_ACT_PREFETCH=0")),
    "hints1_prefetch": dict(defines=("FFN_MIN_BLOCKS=4", "FFN_STREAM_HINTS=1", "FFN_ACT_PREFETCH=1")),
}
# PREFILL_TUNE_BUILDS=hints1,hints1_prefetch: time only these builds; PREFILL_TUNE_ROUNDS: interleaved rounds
if os.environ.get("PREFILL_TUNE_BUILDS"):
    HINTS = {k: HINTS[k] for k in os.environ["PREFILL_TUNE_BUILDS"].split(",")}
ROUNDS = int(os.environ.get("PREFILL_TUNE_ROUNDS", "2"))


# PREFILL_TUNE_GLUES=fused,torch: the hot neurons' relu(a) * u in one kernel (ops.relu_mul, ffn_forward's default:
# SparsePolicy.fused_hot_glue; timed as ..._fusedglue) and/or in torch's two passes (timed without a suffix, the
# names of the sessions before the kernel)
GLUES = os.environ.get("PREFILL_TUNE_GLUES", "fused").split(",")


def _glue_suffix(glue: str) -> str:
    return "" if glue == "torch" else f"_{glue}glue"


def hybrid(x, gate, up, down_t, n_hot, build, glue="fused"):
    """hybrid_ffn with the sparse kernel of `build` (a HINTS entry; gate GEMM included)."""
    act = x @ gate.T  # (M, H)
    hot_out = hot_part(x, act, up, down_t, n_hot, glue == "fused")
    out = torch.empty_like(x)
    launchers.launch_relu_ffn(x, act, up, down_t, out, c_start=n_hot, init=hot_out, **build)
    return out


def prefill(m: int, nnz: float, reps: int = 20) -> dict:
    inp = make_ffn_inputs(m, D_MODEL, HIDDEN, nnz, device="cuda", seed=int(nnz) + m)
    x, gate, up, down = inp.x, inp.gate, inp.up, inp.down
    down_t = down.T.contiguous()
    calib = x[:CALIB_TOKENS]  # as bench --suite ffn: the first tokens calibrate (full width: hot-first only)
    rates = ((calib @ gate.T) > 0).float().mean(0)
    perm, n_hot = hot_first_order(rates)
    full = (gate[perm].contiguous(), up[perm].contiguous(), down_t[perm].contiguous(), n_hot)
    pk = packed_layer(gate, up, down_t, calib)
    packed = (pk.gate, pk.up, pk.down_t, pk.n_hot)
    row = {"M": m, "nnz_target": nnz, "n_hot": n_hot, "packed_width": pk.width, "packed_n_hot": pk.n_hot,
           "nnz_mean": ((x[:4096] @ gate.T) > 0).sum(1).float().mean().item()}
    removed = ~pk.kept
    row["removed_neurons"] = int(removed.sum())
    row["removed_active_entries"] = int(((x @ gate[removed].T) > 0).sum()) if removed.any() else 0
    times: dict[str, list[float]] = {}

    def t(name, fn):
        times.setdefault(name, []).append(cuda_time(fn, reps))

    for _ in range(ROUNDS):  # interleaved rounds
        t("dense", lambda: dense_block(x, gate, up, down))
        t("gate_cublas", lambda: x @ gate.T)
        torch.backends.cuda.preferred_blas_library("cublaslt")
        t("gate_cublaslt", lambda: x @ gate.T)
        torch.backends.cuda.preferred_blas_library("default")
        t("gate_packed", lambda: x @ pk.gate.T)
        for lay_name, lay in (("full", full), ("packed", packed)):
            for hname, defs in HINTS.items():
                for glue in GLUES:
                    t(f"hybrid_{lay_name}_{hname}{_glue_suffix(glue)}", lambda: hybrid(x, *lay, defs, glue))
    for lay_name, (g, u, dt, nh) in (("full", full), ("packed", packed)):
        act = x @ g.T
        hot_out = hot_part(x, act, u, dt, nh)
        outs = {}
        for hname, defs in HINTS.items():
            o = torch.full_like(x, float("nan"))
            t(f"kernel_{lay_name}_{hname}",
              lambda: launchers.launch_relu_ffn(x, act, u, dt, o, c_start=nh, init=hot_out, **defs))
            outs[hname] = o
        first = next(iter(outs.values()))
        row[f"same_bits_{lay_name}"] = all(bool(torch.equal(first, o)) for o in outs.values())
        for glue in GLUES:
            t(f"hot_part_{lay_name}{_glue_suffix(glue)}", lambda: hot_part(x, act, u, dt, nh, glue == "fused"))
            # the same under a CUDA graph: without the host's launch costs (which a small M can expose)
            t(f"hot_part_graph_{lay_name}{_glue_suffix(glue)}",
              graph_replay(lambda: hot_part(x, act, u, dt, nh, glue == "fused")))
    row["ms"] = {k: min(v) for k, v in times.items()}
    row["ms_rounds"] = times
    r = slice(0, 4096)
    ref32 = dense_block(x[r].float(), gate.float(), up.float(), down.float())
    row["rel_err_full"] = _rel(hybrid(x[r], *full, next(iter(HINTS.values()))), ref32)
    row["rel_err_packed"] = _rel(hybrid(x[r], *packed, next(iter(HINTS.values()))), ref32)
    row["rel_err_torch_bf16"] = _rel(dense_block(x[r], gate, up, down), ref32)
    ms = row["ms"]
    row["speedup"] = {k: ms["dense"] / v for k, v in ms.items() if k.startswith("hybrid")}
    return row


def decode(m: int, layers: int = 8, reps: int = 50) -> dict:
    sets, downs_t = decode_layers(m, layers, 300)
    x = sets[0].x
    calib = calib_tokens(CALIB_TOKENS, 77)
    pks = [packed_layer(s.gate, s.up, dt, calib) for s, dt in zip(sets, downs_t)]

    def sparse(g, u, dt, nnz):  # the decode path ffn_forward takes with a known density (mode="sparse")
        if m <= launchers.FUSED_MAX_M:
            return ops.decode_ffn(x, g, u, dt)
        a = ops.gemv(x, g) if m <= launchers.GEMV_MAX_M else x @ g.T
        return ops.relu_ffn(x, a, u, dt)

    nnz = ((x @ sets[0].gate.T) > 0).sum(1).float().mean().item()
    runs = {
        "dense": graph_replay(lambda: [dense_block(x, s.gate, s.up, s.down) for s in sets]),
        "sparse_full": graph_replay(lambda: [sparse(s.gate, s.up, dt, nnz) for s, dt in zip(sets, downs_t)]),
        "sparse_packed": graph_replay(lambda: [sparse(p.gate, p.up, p.down_t, nnz) for p in pks]),
        "gate_full": graph_replay(lambda: [x @ s.gate.T for s in sets]),
        "gate_packed": graph_replay(lambda: [x @ p.gate.T for p in pks]),
    }
    times: dict[str, list[float]] = {}
    for _ in range(2):
        for k, fn in runs.items():
            times.setdefault(k, []).append(cuda_time(fn, reps) / layers * 1e3)
    us = {k: min(v) for k, v in times.items()}
    s0, p0 = sets[0], pks[0]
    ref32 = dense_block(x.float(), s0.gate.float(), s0.up.float(), s0.down.float())
    return {"M": m, "nnz_mean": nnz, "packed_width": p0.width, "us": us, "us_rounds": times,
            "speedup_full": us["dense"] / us["sparse_full"], "speedup_packed": us["dense"] / us["sparse_packed"],
            "rel_err_full": _rel(sparse(s0.gate, s0.up, downs_t[0], nnz), ref32),
            "rel_err_packed": _rel(sparse(p0.gate, p0.up, p0.down_t, nnz), ref32),
            "rel_err_torch_bf16": _rel(dense_block(x, s0.gate, s0.up, s0.down), ref32)}


def row_groups(m: int, layers: int = 8, reps: int = 50) -> dict:
    """The fused decode path with the tensor-core gate kernel's MMA_ROW_GROUP = 1, 4, 16 (16: a block's rows are
    16 neighbours), full-width and packed layers, CUDA graphs over 8 layers; whether the outputs are the same bits."""
    sets, downs_t = decode_layers(m, layers, 300)
    x = sets[0].x
    calib = calib_tokens(CALIB_TOKENS, 77)
    pks = [packed_layer(s.gate, s.up, dt, calib) for s, dt in zip(sets, downs_t)]
    lay = {"full": [(s.gate, s.up, dt) for s, dt in zip(sets, downs_t)],
           "packed": [(p.gate, p.up, p.down_t) for p in pks]}
    o = torch.empty_like(x)
    runs, outs = {}, {}
    for name, ws in lay.items():
        for rg in (1, 4, 16):
            defs = (f"MMA_ROW_GROUP={rg}",)
            runs[f"{name}_rg{rg}"] = graph_replay(
                lambda ws=ws, defs=defs: [launchers.launch_decode_ffn(x, g, u, dt, o, defines=defs) for g, u, dt in ws])
            r = torch.empty_like(x)
            launchers.launch_decode_ffn(x, *ws[0], r, defines=defs)
            outs[f"{name}_rg{rg}"] = r
    runs["dense"] = graph_replay(lambda: [dense_block(x, s.gate, s.up, s.down) for s in sets])
    times: dict[str, list[float]] = {}
    for _ in range(2):
        for k, fn in runs.items():
            times.setdefault(k, []).append(cuda_time(fn, reps) / layers * 1e3)
    same = all(torch.equal(outs[f"{n}_rg1"], outs[f"{n}_rg{rg}"]) for n in lay for rg in (4, 16))
    return {"M": m, "us": {k: min(v) for k, v in times.items()}, "us_rounds": times, "same_bits": same}


def profile(m: int = 65536, nnz: float = 29) -> None:
    """For ncu: the full-width hybrid's sparse kernel, warmed up, then one launch per build in HINTS' order."""
    inp = make_ffn_inputs(m, D_MODEL, HIDDEN, nnz, device="cuda", seed=int(nnz) + m)
    x = inp.x
    rates = ((calib_tokens(CALIB_TOKENS, 5) @ inp.gate.T) > 0).float().mean(0)
    perm, nh = hot_first_order(rates)
    g, u, dt = inp.gate[perm].contiguous(), inp.up[perm].contiguous(), inp.down.T[perm].contiguous()
    act = x @ g.T
    hot_out = hot_part(x, act, u, dt, nh)
    out = torch.empty_like(x)
    for build in list(HINTS.values()) * 2:
        launchers.launch_relu_ffn(x, act, u, dt, out, c_start=nh, init=hot_out, **build)
    torch.cuda.synchronize()


def main() -> None:
    if sys.argv[1] == "profile":
        profile()
        return
    out = sys.argv[1]
    parts = sys.argv[2:] or ["prefill", "decode"]
    result = {"environment": environment(), "prefill": [], "decode": []}
    if "prefill" in parts:
        for m in (16384, 65536):
            for nnz in (29, 56, 112):
                result["prefill"].append(prefill(m, nnz))
                torch.cuda.empty_cache()  # the row's tensors went with its frame
                r = result["prefill"][-1]
                print(json.dumps({k: r[k] for k in ("M", "nnz_target", "packed_width", "removed_active_entries",
                                                    "same_bits_full", "same_bits_packed", "rel_err_packed",
                                                    "rel_err_torch_bf16")}),
                      {k: round(v, 3) for k, v in r["ms"].items()}, {k: round(v, 2) for k, v in r["speedup"].items()},
                      flush=True)
                json.dump(result, open(out, "w"), indent=1)
    if "rowgroup" in parts:
        result["row_groups"] = []
        for m in (8, 16):
            result["row_groups"].append(row_groups(m))
            r = result["row_groups"][-1]
            print(m, r["same_bits"], {k: round(v, 2) for k, v in r["us"].items()}, flush=True)
            json.dump(result, open(out, "w"), indent=1)
    if "decode" in parts:
        for m in (1, 8, 16, 17, 32, 64):
            result["decode"].append(decode(m))
            r = result["decode"][-1]
            print(m, {k: round(v, 1) for k, v in r["us"].items()}, round(r["speedup_full"], 2),
                  round(r["speedup_packed"], 2), f"err {r['rel_err_packed']:.2e} / {r['rel_err_torch_bf16']:.2e}",
                  flush=True)
            json.dump(result, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
