"""Decode with the likely-active rows of U and Downᵀ fetched into L2 beside the gate projection (development tool).

At 17…64 tokens decode runs cuBLAS's gate GEMM (well under the memory's bandwidth at this size), then two kernels
whose U and Downᵀ row reads wait on HBM. A packed layer is in hot-first order (decreasing firing rate), so its first
K neurons' rows are the likeliest to be read: a side stream forked before the gate projection prefetches them into
L2 (kernels_cu/l2_prefetch.cu) while the GEMM runs, and joins after the block. Timed as CUDA-graph replays over
LAYERS independent layers (weights not L2-resident across layers), µs per layer, best of ROUNDS interleaved rounds;
the production path (ffn_forward's route for a packed layer with its calibrated density) against K rows prefetched,
per prefetch build (PREFETCH_MODE 0 lines, 1 lines evict-last, 2 bulk), and dense.

    python3 tests/gpu/decode_prefetch.py OUT.json [M ...]     # DECODE_PREFETCH_ROUNDS=3
"""

from __future__ import annotations

import json
import os
import sys

import torch

from sparsify_cli.bench.ffn import (CALIB_TOKENS, calib_tokens, cuda_time, decode_layers, dense_block, graph_replay,
                                    packed_layer)
from sparsify_cli.kernels import launchers, ops

ROUNDS = int(os.environ.get("DECODE_PREFETCH_ROUNDS", "3"))
LAYERS = 8
KS = (256, 1024, 0)  # 0: the whole width


def block(x, p, m):
    """The path ffn_forward takes for a packed layer of m tokens with a known density (CUDA graph)."""
    if m <= launchers.FUSED_MAX_M:
        return ops.decode_ffn(x, p.gate, p.up, p.down_t)
    gate = ops.gemv(x, p.gate) if m <= launchers.GEMV_MAX_M else x @ p.gate.T
    return ops.relu_ffn(x, gate, p.up, p.down_t)


def gate_gemm(x, p, m):
    return x @ p.gate.T


def on_main(k: int, defines: tuple[str, ...], blocks: int, body=block):
    """The prefetch launched on the block's own stream right before the gate projection (a bulk prefetch's kernel
    issues its copies and exits, so the GEMM starts at once with the copies in flight)."""
    def run(x, p, m):
        rows = min(k, p.gate.shape[0])
        launchers.launch_l2_prefetch(p.up[:rows], p.down_t[:rows], defines=defines, blocks=blocks)
        return body(x, p, m)
    return run


def with_prefetch(side: torch.cuda.Stream, k: int, which: str, defines: tuple[str, ...], body=block):
    def run(x, p, m):
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)
        rows = p.gate.shape[0] if k == 0 else min(k, p.gate.shape[0])
        with torch.cuda.stream(side):
            ranges = {"both": (p.up[:rows], p.down_t[:rows]), "down": (p.down_t[:rows],),
                      "up": (p.up[:rows],)}[which]
            launchers.launch_l2_prefetch(*ranges, defines=defines)
        out = body(x, p, m)
        cur.wait_stream(side)
        return out
    return run


def main() -> None:
    out_path = sys.argv[1]
    ms = [int(v) for v in sys.argv[2:]] or [8, 16, 17, 32, 64]
    side = torch.cuda.Stream()
    rows = []
    for m in ms:
        sets, downs_t = decode_layers(m, LAYERS, 500)
        x = sets[0].x
        calib = calib_tokens(CALIB_TOKENS, 7)
        packed = [packed_layer(s.gate, s.up, dt, calib) for s, dt in zip(sets, downs_t)]
        del calib
        ref = [block(x, p, m).float() for p in packed]
        variants = {"dense": None, "base": block}
        for k in KS:
            variants[f"both_k{k}"] = with_prefetch(side, k, "both", ())
        variants["both_k1024_evict_last"] = with_prefetch(side, 1024, "both", ("PREFETCH_MODE=1",))
        variants["both_k1024_bulk"] = with_prefetch(side, 1024, "both", ("PREFETCH_MODE=2",))
        variants["down_k1024"] = with_prefetch(side, 1024, "down", ())
        for k in (256, 512, 1024):
            variants[f"main_bulk_k{k}"] = on_main(k, ("PREFETCH_MODE=2", "PREFETCH_CHUNK=16384"), 4)
        variants["main_bulk_k1024_b32"] = on_main(1024, ("PREFETCH_MODE=2", "PREFETCH_CHUNK=4096"), 32)
        variants["main_lines_k512"] = on_main(512, (), 64)
        # the gate projection alone, and beside each kind of prefetch: do they overlap?
        timed_only = {"gate_only": gate_gemm,
                      "gate_side_k1024": with_prefetch(side, 1024, "both", (), gate_gemm),
                      "gate_main_bulk_k1024": on_main(1024, ("PREFETCH_MODE=2", "PREFETCH_CHUNK=16384"), 4,
                                                      gate_gemm)}
        # the same bits with and without the prefetch (it writes nothing)
        for name, fn in variants.items():
            if fn is None or name == "base":
                continue
            for p, r in zip(packed, ref):
                got = fn(x, p, m).float()
                torch.cuda.synchronize()
                assert torch.equal(got, r), f"{name} changed the block's output at M={m}"
        replays = {}
        for name, fn in {**variants, **timed_only}.items():
            if fn is None:
                replays[name] = graph_replay(lambda: [dense_block(x, s.gate, s.up, s.down) for s in sets])
            else:
                replays[name] = graph_replay(lambda fn=fn: [fn(x, p, m) for p in packed])
        rounds: dict[str, list[float]] = {k: [] for k in replays}
        for _ in range(ROUNDS):
            for k, r in replays.items():
                rounds[k].append(cuda_time(r, 100) / LAYERS * 1e3)
        us = {k: min(v) for k, v in rounds.items()}
        row = {"M": m, "width": packed[0].width, "n_hot": packed[0].n_hot, "us": us, "us_rounds": rounds,
               "speedup": {k: us["dense"] / v for k, v in us.items() if k != "dense"}}
        print(f"M={m}: " + ", ".join(f"{k} {v:.1f}" for k, v in us.items()) + " (us per layer)", flush=True)
        rows.append(row)
        del sets, downs_t, packed, replays
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "rounds": ROUNDS, "layers": LAYERS, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
