"""FFN block benchmark: dense (3 cuBLAS GEMMs, bf16) vs the TwELL sparse path, same process, same inputs.

    python -m sparsify_cli.bench.ffn --out bench_results/ffn_h100.json [--quick]

Prefill rows: D=2048, H=5632, M in {16384, 65536}, nnz/token in {29, 56, 112} (PERFORMANCE.md's input
recipe, sparsify_cli.bench.synthetic). Decode rows: M in {1, 8, 16, 64} at 99.5% sparsity, timed as CUDA-graph
replays over 4 independent layers' weights (so weights are not L2-resident across repetitions, as in a model),
and the same layers as `sparsify pack` lays them out (PackedLayer: dead neurons removed, hot-first).
Timing: CUDA events, warm-up, median of >= 20 repetitions. Error: ‖out − ref32‖/‖ref32‖ on the first rows,
ref32 = the block in fp32 from the same bf16 inputs; torch-bf16's own error is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparsify_cli.bench.synthetic import make_ffn_inputs, recipe_tokens
from sparsify_cli.pack import layout
from sparsify_cli.pack.pack import PackOptions

D_MODEL, HIDDEN = 2048, 5632
PREFILL_M = (16384, 65536)
PREFILL_NNZ = (29, 56, 112)
DECODE_M = (1, 8, 16, 64)
DECODE_SPARSITY = 0.995
TILE, SLOTS = 256, 32
CALIB_TOKENS = PackOptions().calib_tokens  # tokens a packed layer is calibrated on (as `sparsify pack`)


@dataclass
class PackedLayer:
    """One FFN layer as `sparsify pack` lays it out (pack.layout): neurons that fired on no calibration token
    removed, the rest hot-first, the width padded with zero neurons; weights (width, D) each."""

    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor
    n_hot: int
    nnz_hint: float  # calibrated mean active neurons per token (ffn_forward's nnz_hint)
    cold_nnz_hint: float  # ... over the cold neurons (>= n_hot), the hybrid prefill's rule
    kept: torch.Tensor  # (H,) bool: the source neurons that stay

    @property
    def width(self) -> int:
        return self.gate.shape[0]


def packed_layer(gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor, calib_x: torch.Tensor) -> PackedLayer:
    """The packed twin of a layer (gate, up, down_t: (H, D)) from calibration tokens calib_x (N, D)."""
    fires = ((calib_x @ gate.T) > 0).sum(0).cpu()  # (H,) firing counts
    tokens = calib_x.shape[0]
    order, n_hot, _ = layout.layer_order(fires, tokens, "hot")
    idx = order.to(gate.device)
    w = layout.pad_width({"gate": gate[idx], "up": up[idx], "down_t": down_t[idx]})
    rates = fires[order].double() / tokens
    kept = torch.zeros(gate.shape[0], dtype=torch.bool, device=gate.device)
    kept[idx] = True
    return PackedLayer(w["gate"].contiguous(), w["up"].contiguous(), w["down_t"].contiguous(), n_hot,
                       float(rates.sum()), float(rates[n_hot:].sum()), kept)


def calib_tokens(n: int, seed: int) -> torch.Tensor:
    """n calibration tokens of the input recipe (width D_MODEL), drawn apart from any timed tokens."""
    return recipe_tokens(n, D_MODEL, torch.Generator(device="cuda").manual_seed(seed), device="cuda")


def removed_share(x: torch.Tensor, gate: torch.Tensor, kept: torch.Tensor) -> float:
    """Share of x's activations (relu(x·gateᵀ) > 0) that fall on neurons a packed layer removed (pruning's price:
    neurons silent on the calibration tokens that fire on these)."""
    act = x @ gate.T  # (M, H)
    total = int((act > 0).sum())
    return int((act[:, ~kept] > 0).sum()) / max(total, 1)


def cuda_time(fn, reps: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of fn() over ``reps`` runs, CUDA events, after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_replay(fn):
    """fn captured in a CUDA graph (after 3 warm-up calls on a side stream); returns the graph's replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def dense_block(x, gate, up, down):
    return F.linear(torch.relu(F.linear(x, gate)) * F.linear(x, up), down)


def _rel(a, ref):
    return ((a.float() - ref).norm() / ref.norm()).item()


def environment() -> dict:
    env = {
        "gpu": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import cupy

        env["cupy"] = cupy.__version__
        env["nvrtc"] = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as exc:  # pragma: no cover
        env["cupy"] = f"unavailable: {exc}"
    return env


def prefill_row(m: int, nnz: float, reps: int, err_rows: int = 4096) -> dict:
    from sparsify_cli.kernels import launchers, ops
    from sparsify_cli.kernels.ffn import ffn_forward

    inp = make_ffn_inputs(m, D_MODEL, HIDDEN, nnz, device="cuda", seed=int(nnz) + m)
    x, gate, up, down = inp.x, inp.gate, inp.up, inp.down
    down_t = down.T.contiguous()
    act = x @ gate.T
    words = ops.twell_pack(act, TILE, SLOTS)
    counts = words[:, :, 0]
    per_tok = counts.sum(1).float()
    row = {
        "kind": "prefill", "M": m, "D": D_MODEL, "H": HIDDEN, "nnz_target": nnz,
        "nnz_mean": per_tok.mean().item(), "nnz_max": int(per_tok.max().item()),
        "max_per_tile": int(counts.max().item()), "overflow_tiles": int((counts > SLOTS - 1).sum().item()),
        "tile": TILE, "slots": SLOTS,
    }
    out = torch.empty_like(x)

    def sparse():  # gate GEMM + fused list-building sparse kernel (what ffn_forward runs)
        a = x @ gate.T
        return ops.relu_ffn(x, a, up, down_t)

    def sparse_twell():  # gate GEMM + TwELL pack + TwELL kernel
        a = x @ gate.T
        w = ops.twell_pack(a, TILE, SLOTS)
        return ops.twell_ffn(x, w, up, down_t, a, TILE)

    row["dense_ms"] = cuda_time(lambda: dense_block(x, gate, up, down), reps)
    row["gate_gemm_ms"] = cuda_time(lambda: x @ gate.T, reps)
    row["pack_ms"] = cuda_time(lambda: launchers.launch_twell_pack(act, words, TILE, SLOTS), reps)
    variants = {  # numbered versions of the prefill kernel, timed side by side (BENCHMARKS.md)
        "ffn_kernel_mb3_ms": dict(defines=("FFN_MIN_BLOCKS=3",), split=False),
        "ffn_kernel_mb4_ms": dict(defines=("FFN_MIN_BLOCKS=4",), split=False),
        "ffn_kernel_split_ms": dict(defines=("FFN_MIN_BLOCKS=4",), split=True),
        "ffn_kernel_split_mb3_ms": dict(defines=("FFN_MIN_BLOCKS=3",), split=True),
    }
    for name, kw in variants.items():
        row[name] = cuda_time(lambda: launchers.launch_twell_ffn(x, words, up, down_t, act, out, TILE, **kw), reps)
    row["ffn_kernel_ms"] = cuda_time(lambda: launchers.launch_twell_ffn(x, words, up, down_t, act, out, TILE), reps)
    row["fused_kernel_ms"] = cuda_time(lambda: launchers.launch_relu_ffn(x, act, up, down_t, out), reps)
    row["sparse_ms"] = cuda_time(sparse, reps)
    row["sparse_twell_ms"] = cuda_time(sparse_twell, reps)
    row["auto_ms"] = cuda_time(lambda: ffn_forward(x, gate, up, down_t, mode="auto", kernels="cuda"), reps)
    row["auto_hint_ms"] = cuda_time(
        lambda: ffn_forward(x, gate, up, down_t, mode="auto", kernels="cuda", nnz_hint=row["nnz_mean"]), reps)
    # hybrid: hot-first neuron order from firing rates measured on a calibration slice (pack time, untimed)
    from sparsify_cli.kernels.ffn import hot_first_order, hybrid_ffn

    rates = (act[: min(m, 8192)] > 0).float().mean(0)
    perm, n_hot = hot_first_order(rates)
    gate_p, up_p, down_t_p = gate[perm].contiguous(), up[perm].contiguous(), down_t[perm].contiguous()
    row["n_hot"] = n_hot
    row["hot_entry_share"] = (rates[perm[:n_hot]].sum() / rates.sum()).item()

    def hybrid():
        a = x @ gate_p.T
        return hybrid_ffn(x, a, up_p, down_t_p, n_hot)

    row["hybrid_ms"] = cuda_time(hybrid, reps)
    sweep = []  # the hot threshold's sensitivity (the default is hot_first_order's)
    for th in (0.004, 0.007, 0.016, 0.025):
        p2, n2 = hot_first_order(rates, threshold=th)
        g2, u2, d2 = gate[p2].contiguous(), up[p2].contiguous(), down_t[p2].contiguous()
        ms = cuda_time(lambda: hybrid_ffn(x, x @ g2.T, u2, d2, n2), reps)
        sweep.append({"threshold": th, "n_hot": n2, "ms": ms})
        del g2, u2, d2
    row["hybrid_threshold_sweep"] = sweep
    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
    row["speedup_hybrid"] = row["dense_ms"] / row["hybrid_ms"]
    row["speedup_auto"] = row["dense_ms"] / row["auto_ms"]
    r = slice(0, min(m, err_rows))
    ref32 = dense_block(x[r].float(), gate.float(), up.float(), down.float())
    row["auto_hybrid_ms"] = cuda_time(
        lambda: ffn_forward(x, gate_p, up_p, down_t_p, mode="auto", kernels="cuda", n_hot=n_hot), reps)
    row["rel_err_sparse"] = _rel(sparse()[r], ref32)
    row["rel_err_sparse_twell"] = _rel(sparse_twell()[r], ref32)
    row["rel_err_hybrid"] = _rel(hybrid()[r], ref32)
    row["rel_err_torch_bf16"] = _rel(dense_block(x[r], gate, up, down), ref32)
    del inp, x, act, words, out
    torch.cuda.empty_cache()
    return row


def fused_gate_variants(m: int) -> list[tuple[str, int | None, int]]:
    """The fused path's gate-kernel variants that decode_row times for m tokens, as (impl, rows per warp, blocks
    per SM): tensor cores (mma), and CUDA cores (gemv) where that kernel has instances (no-spill ones only)."""
    from sparsify_cli.kernels.launchers import FUSED_GEMV_MAX_M

    combos: list[tuple[str, int | None, int]] = [("mma", None, 3)]
    if m <= FUSED_GEMV_MAX_M:
        combos.append(("gemv", 2, 3))
    if m == 1:
        combos += [("gemv", 4, 3), ("gemv", 2, 4)]
    return combos


def decode_layers(m: int, layers: int, seed: int, nnz: float | None = None) -> tuple[list, list]:
    """`layers` independent decode layers of m tokens (PERFORMANCE.md's inputs, D_MODEL x HIDDEN, nnz active
    neurons per token; default: DECODE_SPARSITY), seeds seed, seed + 1, ...: (input sets, their Downᵀ)."""
    if nnz is None:
        nnz = (1 - DECODE_SPARSITY) * HIDDEN
    sets = [make_ffn_inputs(m, D_MODEL, HIDDEN, nnz, device="cuda", seed=seed + i) for i in range(layers)]
    return sets, [s.down.T.contiguous() for s in sets]


def decode_row(m: int, reps: int, layers: int = 4, nnz: float | None = None) -> dict:
    """Dense vs sparse decode of m tokens over `layers` layers under CUDA graphs, with the fused path's kernel
    variants."""
    from sparsify_cli.kernels import launchers, ops
    from sparsify_cli.kernels.launchers import FUSED_MAX_M, GEMV_MAX_M

    if nnz is None:
        nnz = (1 - DECODE_SPARSITY) * HIDDEN
    sets, downs_t = decode_layers(m, layers, 100, nnz)
    x = sets[0].x
    calib = calib_tokens(CALIB_TOKENS, 7)
    packed = [packed_layer(s.gate, s.up, dt, calib) for s, dt in zip(sets, downs_t)]
    del calib

    def dense_all():
        for s in sets:
            dense_block(x, s.gate, s.up, s.down)

    def gate(s, inp):  # what ffn_forward uses: the gemv kernel for 1..2 tokens, else cuBLAS
        return ops.gemv(inp, s.gate) if m <= GEMV_MAX_M else inp @ s.gate.T

    fused = m <= FUSED_MAX_M

    def unfused_one(s, dt, inp=x):  # gate projection, then the decode kernel lists entries straight from act
        return ops.relu_ffn(inp, gate(s, inp), s.up, dt)

    def sparse_one(s, dt, inp=x):  # the decode path ffn_forward takes with a known density
        return ops.decode_ffn(inp, s.gate, s.up, dt) if fused else unfused_one(s, dt, inp)

    def sparse_all():
        for s, dt in zip(sets, downs_t):
            sparse_one(s, dt)

    def packed_all():  # the same path on the layers as `sparsify pack` lays them out (PackedLayer)
        for p in packed:
            sparse_one(p, p.down_t)

    def unfused_all():
        for s, dt in zip(sets, downs_t):
            unfused_one(s, dt)

    def twell_all():  # through TwELL words (pack + decode kernel)
        for s, dt in zip(sets, downs_t):
            a = x @ s.gate.T
            ops.twell_ffn(x, ops.twell_pack(a, TILE, SLOTS), s.up, dt, a, TILE)

    counts = ops.twell_pack(x @ sets[0].gate.T, TILE, SLOTS)[:, :, 0]
    row = {"kind": "decode", "M": m, "D": D_MODEL, "H": HIDDEN, "sparsity": 1 - nnz / HIDDEN,
           "nnz_target": nnz, "nnz_mean": counts.sum(1).float().mean().item(),
           "nnz_max": int(counts.sum(1).max().item()), "max_per_tile": int(counts.max().item()),
           "layers_per_replay": layers}
    row["dense_ms"] = cuda_time(graph_replay(dense_all), reps) / layers
    row["sparse_ms"] = cuda_time(graph_replay(sparse_all), reps) / layers
    row["sparse_path"] = "fused (decode_gate_up + decode_down)" if fused else "gate projection + decode kernel"
    row["packed_ms"] = cuda_time(graph_replay(packed_all), reps) / layers
    row["speedup_packed"] = row["dense_ms"] / row["packed_ms"]
    row["packed_width"] = packed[0].width
    row["packed_removed_share"] = removed_share(x, sets[0].gate, packed[0].kept)
    if fused:
        row["sparse_unfused_ms"] = cuda_time(graph_replay(unfused_all), reps) / layers
        row["fused_gate_up_ms"] = cuda_time(
            graph_replay(lambda: [launchers.launch_decode_gate_up(x, s.gate, s.up) for s in sets]), reps) / layers
        variants = {}
        for impl, rows, mb in fused_gate_variants(m):
            out_v = torch.empty_like(x)
            defines = (f"FUSED_GATE_MIN_BLOCKS={mb}",)
            variants[f"{impl}" + (f"_rows{rows}_minblocks{mb}" if rows else "")] = cuda_time(graph_replay(lambda: [
                launchers.launch_decode_ffn(x, s.gate, s.up, dt, out_v, rows=rows, defines=defines, impl=impl)
                for s, dt in zip(sets, downs_t)]), reps) / layers
        # the down kernel without programmatic dependent launch (the default on Hopper)
        out_v = torch.empty_like(x)
        variants["no_pdl"] = cuda_time(graph_replay(lambda: [
            launchers.launch_decode_ffn(x, s.gate, s.up, dt, out_v, pdl=False) for s, dt in zip(sets, downs_t)]),
            reps) / layers
        row["fused_variants_ms"] = variants

    # chained layers: each layer's input comes out of a residual add on the previous layer's output, as in a
    # model, so no kernel can start on data it does not have yet (alpha=0 keeps x's values, hence the calibrated
    # density, in every layer)
    def chain(block):
        def run():
            h = x
            for s, dt in zip(sets, downs_t):
                h = torch.add(x, block(h, s, dt), alpha=0.0)
        return run

    row["dense_chain_ms"] = cuda_time(graph_replay(chain(lambda h, s, dt: dense_block(h, s.gate, s.up, s.down))),
                                      reps) / layers
    row["sparse_chain_ms"] = cuda_time(graph_replay(chain(lambda h, s, dt: sparse_one(s, dt, h))), reps) / layers
    row["speedup_chain"] = row["dense_chain_ms"] / row["sparse_chain_ms"]
    if fused:
        def fused_no_pdl(h, s, dt):
            o = torch.empty_like(h)
            launchers.launch_decode_ffn(h, s.gate, s.up, dt, o, pdl=False)
            return o
        row["sparse_chain_no_pdl_ms"] = cuda_time(graph_replay(chain(fused_no_pdl)), reps) / layers
    row["sparse_twell_ms"] = cuda_time(graph_replay(twell_all), reps) / layers
    row["gate_gemm_ms"] = cuda_time(graph_replay(lambda: [x @ s.gate.T for s in sets]), reps) / layers
    if m <= GEMV_MAX_M:
        from sparsify_cli.kernels.launchers import launch_gemv

        gout = torch.empty(m, HIDDEN, dtype=x.dtype, device=x.device)
        row["gate_gemv_ms"] = cuda_time(graph_replay(lambda: [ops.gemv(x, s.gate) for s in sets]), reps) / layers
        row["gate_gemv_rows2_ms"] = cuda_time(
            graph_replay(lambda: [launch_gemv(x, s.gate, gout, rows=2) for s in sets]), reps) / layers
    acts = [x @ s.gate.T for s in sets]
    row["decode_kernel_ms"] = cuda_time(
        graph_replay(lambda: [ops.relu_ffn(x, a, s.up, dt) for a, s, dt in zip(acts, sets, downs_t)]), reps) / layers
    # the decode path from the gate projection's output (launch_relu_ffn: what ffn_forward runs above FUSED_MAX_M
    # tokens or without a known density), gate projection included, with its kernels launched without
    # programmatic dependent launch (the default on Hopper), and with it for the down kernel only
    act_variants = {}
    for name, opts in (("no_pdl", {"pdl": False, "pdl_up": False}), ("pdl_down_only", {"pdl_up": False})):
        out_v = torch.empty_like(x)
        act_variants[name] = cuda_time(graph_replay(lambda: [
            launchers.launch_relu_ffn(x, gate(s, x), s.up, dt, out_v, path="decode", **opts)
            for s, dt in zip(sets, downs_t)]), reps) / layers
    row["decode_act_variants_ms"] = act_variants
    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
    s0 = sets[0]
    ref32 = dense_block(x.float(), s0.gate.float(), s0.up.float(), s0.down.float())
    row["rel_err_sparse"] = _rel(sparse_one(s0, downs_t[0]), ref32)
    row["rel_err_packed"] = _rel(sparse_one(packed[0], packed[0].down_t), ref32)
    if fused:
        row["rel_err_unfused"] = _rel(unfused_one(s0, downs_t[0]), ref32)
    row["rel_err_torch_bf16"] = _rel(dense_block(x, s0.gate, s0.up, s0.down), ref32)
    return row


def calibrate(reps: int = 20, overrides: tuple[str, ...] = ()) -> dict:
    """Where the sparse path stops paying, measured: the policy suite's sweep (bench/policy.py, its paper preset:
    prefill at M = 16384, the fused decode path at 16 tokens, the two-kernel decode path at 64) without writing a
    policy file. Returns the points per kind and each kind's limit by device_policy.crossover (the largest density
    at which sparse took at most 0.97 x dense time there and at every lower one), i.e. the values for SparsePolicy.
    ``overrides``: more of the policy suite's settings (e.g. ``shapes=quick``)."""
    from sparsify_cli.bench import policy
    from sparsify_cli.bench import settings as bench_settings
    from sparsify_cli.kernels.device_policy import crossover

    s = bench_settings.resolve("policy", "cuda", [f"reps={reps}", *overrides])
    out: dict = {"prefill": [], "fused_decode": [], "decode": []}
    for kind, m, nnz in policy.points(s):
        out[kind].append(policy.point(policy.measure(s, kind, m, nnz)))
    for kind in ("prefill", "fused_decode", "decode"):
        out[f"{kind}_max_density"] = crossover(out[kind])
    return out


def run(quick: bool = False, reps: int = 30, calib: bool = True) -> dict:
    ms = (4096,) if quick else PREFILL_M
    rows = []
    for m in ms:
        for nnz in PREFILL_NNZ:
            rows.append(prefill_row(m, nnz, reps))
            print(json.dumps(rows[-1]), flush=True)
    for m in DECODE_M:
        rows.append(decode_row(m, reps))
        print(json.dumps(rows[-1]), flush=True)
    result = {"environment": environment(), "timing": f"CUDA events, 5 warm-up, median of {reps}", "rows": rows}
    if calib:
        result["calibration"] = calibrate()
        print(json.dumps(result["calibration"]), flush=True)
    return result


def format_table(result: dict) -> str:
    nan = float("nan")
    lines = ["| kind | M | nnz mean/max | max/tile | dense ms | sparse ms | speed-up | hybrid ms (n_hot) | "
             "hybrid speed-up | via TwELL ms | gate ms | "
             "pack ms | TwELL kernel ms (mb3 / split) | fused kernel ms | auto / auto+hint ms | rel err sparse / bf16 |",
             "|" + "---|" * 16]
    for r in result["rows"]:
        lines.append(
            f"| {r['kind']} | {r['M']} | {r['nnz_mean']:.1f} / {r['nnz_max']} | {r['max_per_tile']} | "
            f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}× | {r.get('hybrid_ms', nan):.3f} "
            f"({r.get('n_hot', 0)}) | {r.get('speedup_hybrid', nan):.2f}× | {r.get('sparse_twell_ms', nan):.3f} | "
            f"{r.get('gate_gemm_ms', nan):.3f} | {r.get('pack_ms', nan):.3f} | "
            f"{r.get('ffn_kernel_ms', nan):.3f} ({r.get('ffn_kernel_mb3_ms', nan):.3f} / "
            f"{r.get('ffn_kernel_split_ms', nan):.3f}) | {r.get('fused_kernel_ms', nan):.3f} | "
            f"{r.get('auto_ms', nan):.3f} / {r.get('auto_hint_ms', nan):.3f} | "
            f"{r['rel_err_sparse']:.2e} / {r['rel_err_torch_bf16']:.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="write the JSON result here")
    p.add_argument("--quick", action="store_true", help="one small prefill size (smoke test)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--no-calibrate", action="store_true", help="skip the dense/sparse crossover sweep")
    args = p.parse_args(argv)
    from sparsify_cli.kernels.availability import cuda_kernels_status

    ok, why = cuda_kernels_status()
    if not ok:
        print(f"bench needs the CUDA kernels: {why}", file=sys.stderr)
        return 2
    result = run(args.quick, args.reps, calib=not args.no_calibrate)
    result["environment"]["bench"] = "sparsify_cli.bench.ffn"
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(format_table(result))
    if "calibration" in result:
        c = result["calibration"]
        print(f"calibration: sparse pays up to density {c['prefill_max_density']:.4f} (prefill, M=16384), "
              f"{c['fused_decode_max_density']:.4f} (fused decode, M=16), {c['decode_max_density']:.4f} (decode, "
              "M=64)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
