"""Experiment: the gate GEMM hands the sparse kernel a relu bitmask (cuBLASLt's RELU_AUX epilogue) instead of the
kernel scanning the activation row (development tool; run with `bash tests/gpu/run_on_device.sh mask`).

Why: the hybrid's cold-neuron kernel lists each token's entries by scanning its activation row, 512 columns per
dependent step (7 steps for a packed layer's ~3,450 cold columns); a full-width layer scans 1,664 more (dead)
columns and its kernel takes ~0.2 ms more at 65536 tokens (session 11), so the scan looks like ~0.4 ms of the
packed kernel's 1.33 ms. With the bitmask a token's listing is one word per lane and one value load per entry.
Predicted, packed layer, 65536 tokens, nnz 29: the kernel 0.2-0.35 ms faster, the gate GEMM through cuBLASLt
0-0.07 ms slower than cuBLAS (session 8 measured cuBLASLt without an epilogue 2-4% slower), the block net
0.15-0.3 ms faster (3.19 -> ~2.95 ms, 2.5x dense).

Per prefill shape (D 2048, H 5632, M 16384 / 65536, nnz 29 / 56 / 112), for the layer as `sparsify pack` lays it
out and for every neuron in hot-first order:
  checks  cuBLASLt's act against relu(x·Gᵀ) by cuBLAS (max relative difference), its bitmask against
          relu_bitmask(its act) (exact), the kernel from the bitmask against the kernel scanning act (same bits)
  times   gate GEMM (cuBLAS) and gate GEMM + bitmask (cuBLASLt), the cold kernel scanning / from the bitmask
          (hybrid: c_start = n_hot, init = the hot part), the whole block as ffn_forward runs it and with the
          bitmask, dense; ROUNDS interleaved rounds, best round per cell

    python3 tests/gpu/mask_tune.py OUT.json           # MASK_TUNE_SHAPES=65536x29,16384x29 to pick shapes
    python3 tests/gpu/mask_tune.py OUT.json algos     # every algorithm cuBLASLt's heuristic offers, per shape and
                                                      # layout: its time beside cuBLAS's, and its bitmask's
                                                      # extra / missing bits against relu_bitmask(its act)
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from sparsify_cli.bench.ffn import (CALIB_TOKENS, D_MODEL, HIDDEN, PREFILL_M, PREFILL_NNZ, _rel, calib_tokens,
                                    cuda_time, dense_block, environment, packed_layer)
from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels import ffn_forward, launchers
from sparsify_cli.kernels.ffn import hot_first_order, hot_part
from sparsify_cli.kernels.reference import relu_bitmask

ROUNDS = int(os.environ.get("MASK_TUNE_ROUNDS", "3"))


def shapes() -> list[tuple[int, int]]:
    if os.environ.get("MASK_TUNE_SHAPES"):
        return [tuple(int(v) for v in s.split("x")) for s in os.environ["MASK_TUNE_SHAPES"].split(",")]
    return [(m, nnz) for m in PREFILL_M for nnz in PREFILL_NNZ]


def row(m: int, nnz: int) -> dict:
    """Both layouts of one shape: the layer as `sparsify pack` lays it out, and every neuron in hot-first order."""
    inp = make_ffn_inputs(m, D_MODEL, HIDDEN, nnz, device="cuda", seed=int(nnz) + m)
    calib = calib_tokens(CALIB_TOKENS, m + 1)
    pk = packed_layer(inp.gate, inp.up, inp.down.T.contiguous(), calib)
    perm, n_hot = hot_first_order(((calib @ inp.gate.T) > 0).float().mean(0))
    del calib
    out = {"M": m, "nnz_target": nnz, "packed_width": pk.width}
    layouts = {"packed": (pk.gate, pk.up, pk.down_t, pk.n_hot),
               "full": (inp.gate[perm].contiguous(), inp.up[perm].contiguous(), inp.down.T[perm].contiguous(), n_hot)}
    dense_ms = None
    for name, (gate, up, down_t, hot_n) in layouts.items():
        r = layout_row(inp, gate, up, down_t, hot_n, time_dense=dense_ms is None)
        dense_ms = dense_ms or r["ms"]["dense"]
        r["speedup_block"] = dense_ms / r["ms"]["block"]
        if "block_mask" in r["ms"]:
            r["speedup_block_mask"] = dense_ms / r["ms"]["block_mask"]
        out[name] = r
    out["dense_ms"] = dense_ms
    return out


def layout_row(inp, gate, up, down_t, n_hot: int, time_dense: bool) -> dict:
    x = inp.x
    out = {"width": gate.shape[0], "n_hot": n_hot}
    act = x @ gate.T
    mask = relu_bitmask(act)
    hot = hot_part(x, act, up, down_t, n_hot)

    def cold(a, mk=None):
        o = torch.empty_like(x)
        launchers.launch_relu_ffn(x, a, up, down_t, o, c_start=n_hot, init=hot, mask=mk)
        return o

    out["mask_kernel_same_bits"] = bool(torch.equal(cold(act), cold(act, mask)))
    own = torch.empty_like(mask)  # the bitmask from relu_mask.cu, a pass over act of its own (session 13)
    launchers.launch_relu_mask(act, own, n_hot)
    out["own_mask_same_bits"] = bool(torch.equal(cold(act), cold(act, own)))

    def cold_own(a):
        launchers.launch_relu_mask(a, own, n_hot)
        return cold(a, own)

    def block_own():  # ffn_forward's hybrid with the bitmask pass before the sparse kernel
        a = x @ gate.T
        hot_a = hot_part(x, a, up, down_t, n_hot)
        launchers.launch_relu_mask(a, own, n_hot)
        o = torch.empty_like(x)
        launchers.launch_relu_ffn(x, a, up, down_t, o, c_start=n_hot, init=hot_a, mask=own)
        return o

    fns = {
        "gate_cublas": lambda: x @ gate.T,
        "cold_scan": lambda: cold(act),
        "cold_mask": lambda: cold(act, mask),
        "mask_pass": lambda: launchers.launch_relu_mask(act, own, n_hot),
        "cold_own_mask": lambda: cold_own(act),
        "block": lambda: ffn_forward(x, gate, up, down_t, kernels="cuda", mode="sparse", n_hot=n_hot),
        "block_own_mask": block_own,
    }
    if time_dense:
        fns["dense"] = lambda: dense_block(x, inp.gate, inp.up, inp.down)
    ref32 = dense_block(x[:4096].float(), inp.gate.float(), inp.up.float(), inp.down.float())
    out["rel_err_block"] = _rel(fns["block"]()[:4096], ref32)
    out["block_own_mask_same_bits"] = bool(torch.equal(fns["block"](), block_own()))
    if os.environ.get("MASK_TUNE_LT", "1") == "1":
        lt_rows(inp, x, act, gate, up, down_t, n_hot, ref32, out, fns)
    rounds: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            rounds[k].append(cuda_time(fn, 20))
    out["ms"] = ms = {k: min(v) for k, v in rounds.items()}
    out["ms_rounds"] = rounds
    if "block_mask" in ms:
        out["predicted_block_mask"] = ms["block"] + (ms["cold_mask"] - ms["cold_scan"]) + (
            ms["gate_lt_mask"] - ms["gate_cublas"])
    out["predicted_block_own_mask"] = ms["block"] + ms["cold_own_mask"] - ms["cold_scan"]
    return out


def lt_rows(inp, x, act, gate, up, down_t, n_hot, ref32, out, fns) -> None:
    """The bitmask from cuBLASLt's RELU_AUX gate GEMM (session 12's plan): its checks into out, its timings into fns."""
    m = x.shape[0]
    try:
        from lt_relu_gemm import LtReluGemm

        lt = LtReluGemm(m, D_MODEL, gate.shape[0])
        out["lt_algorithms"] = lt.algorithms
        act_lt, mask_lt = lt.buffers()
        lt(x, gate, act_lt, mask_lt)
        torch.cuda.synchronize()
        ref = torch.relu(act).float()
        out["lt_act_max_rel_diff"] = ((act_lt.float() - ref).abs().max() / ref.abs().max()).item()
        out["lt_act_equal_cublas"] = bool(torch.equal(act_lt, torch.relu(act)))
        out["lt_mask_matches_its_act"] = bool(torch.equal(mask_lt, relu_bitmask(act_lt)))

        def block_mask():
            lt(x, gate, act_lt, mask_lt)
            o = torch.empty_like(x)
            launchers.launch_relu_ffn(x, act_lt, up, down_t, o, c_start=n_hot,
                                      init=hot_part(x, act_lt, up, down_t, n_hot), mask=mask_lt)
            return o

        fns["gate_lt_mask"] = lambda: lt(x, gate, act_lt, mask_lt)
        fns["block_mask"] = block_mask
        out["rel_err_block_mask"] = _rel(block_mask()[:4096], ref32)
    except Exception as exc:  # the bitmask kernel is still timed with the torch-built mask
        out["lt_error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()


def _bits(words: torch.Tensor) -> int:
    """Set bits in an int32 tensor."""
    shifts = torch.arange(32, device=words.device, dtype=torch.int32)
    return int(((words.unsqueeze(-1) >> shifts) & 1).sum())


def algo_row(m: int, nnz: int) -> dict:
    """Session 13's follow-up: mask_tune's first run took the heuristic's first algorithm, which was 7-22% slower
    than cuBLAS's gate GEMM, and its bitmask carried extra bits at some shapes. Each offered algorithm: time
    (interleaved with cuBLAS), act equal to cuBLAS's relu, and the bitmask's extra / missing bits on 4096 rows."""
    from lt_relu_gemm import LtReluGemm

    inp = make_ffn_inputs(m, D_MODEL, HIDDEN, nnz, device="cuda", seed=int(nnz) + m)
    calib = calib_tokens(CALIB_TOKENS, m + 1)
    pk = packed_layer(inp.gate, inp.up, inp.down.T.contiguous(), calib)
    del calib
    x = inp.x
    out = {"M": m, "nnz_target": nnz}
    for name, gate in (("packed", pk.gate), ("full", inp.gate)):
        ref_act = torch.relu(x @ gate.T)
        n_algos = LtReluGemm(m, D_MODEL, gate.shape[0]).algorithms
        fns, checks = {"cublas": lambda: x @ gate.T}, {}
        for i in range(n_algos):
            lt = LtReluGemm(m, D_MODEL, gate.shape[0], algo=i)
            act_lt, mask_lt = lt.buffers()
            mask_lt.fill_(-1)  # poisoned: bits the epilogue does not write show up as extra
            lt(x, gate, act_lt, mask_lt)
            torch.cuda.synchronize()
            want = relu_bitmask(act_lt[:4096])
            got = mask_lt[:4096]
            checks[f"lt{i}"] = {"act_equal_cublas": bool(torch.equal(act_lt, ref_act)),
                                "mask_words_differing": int((mask_lt != relu_bitmask(act_lt)).sum()),
                                "extra_bits_4096": _bits(got & ~want), "missing_bits_4096": _bits(want & ~got),
                                "workspace": int(lt.result.workspace_size), "waves": float(lt.result.waves_count)}
            fns[f"lt{i}"] = (lambda lt=lt, a=act_lt, mk=mask_lt: lt(x, gate, a, mk))
        rounds: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(ROUNDS):
            for k, fn in fns.items():
                rounds[k].append(cuda_time(fn, 20))
        out[name] = {"width": gate.shape[0], "algorithms": n_algos, "checks": checks,
                     "ms": {k: min(v) for k, v in rounds.items()}}
        del fns
        torch.cuda.empty_cache()
    return out


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # lt_relu_gemm beside this file
    algos = len(sys.argv) > 2 and sys.argv[2] == "algos"
    result = {"environment": environment(), "rounds": ROUNDS, "prefill": []}
    for m, nnz in shapes():
        r = algo_row(m, nnz) if algos else row(m, nnz)
        result["prefill"].append(r)
        print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "ms_rounds"} if isinstance(v, dict) else v)
                          for k, v in r.items()}), flush=True)
        torch.cuda.empty_cache()
    with open(sys.argv[1], "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
