"""What the prefill development tools share (hot_tune.py, hybrid_order.py, block_gaps.py, host_cost.py, ...): the
shapes to time, from an environment variable, a shape's inputs and packed layer, and the loop that times one row
per shape, prints it and writes the JSON."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch

from sparsify_cli.bench.ffn import CALIB_TOKENS, D_MODEL, HIDDEN, calib_tokens, environment, packed_layer
from sparsify_cli.bench.synthetic import make_ffn_inputs


def shapes(env: str, default: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(M, nnz) pairs from ``env`` ("65536x29,16384x29"), else ``default``."""
    spec = os.environ.get(env)
    if not spec:
        return default
    return [tuple(int(v) for v in s.split("x")) for s in spec.split(",")]


def packed_inputs(m: int, nnz: int, full: bool = False):
    """(inputs, layer) for M tokens at nnz active neurons: PERFORMANCE.md's inputs (seed nnz + M) and the layer as
    `sparsify pack` lays it out from calibration tokens (PackedLayer); ``full``: every neuron kept, hot first (the
    ffn suite's "sparse" rows), in the same type."""
    inp = make_ffn_inputs(m, D_MODEL, HIDDEN, nnz, device="cuda", seed=int(nnz) + m)
    calib = calib_tokens(CALIB_TOKENS, m + 1)
    pk = packed_layer(inp.gate, inp.up, inp.down.T.contiguous(), calib)
    if full:
        from sparsify_cli.kernels.ffn import hot_first_order

        perm, n_hot = hot_first_order(((calib @ inp.gate.T) > 0).float().mean(0))
        pk = type(pk)(inp.gate[perm].contiguous(), inp.up[perm].contiguous(), inp.down.T[perm].contiguous(), n_hot,
                      pk.nnz_hint, pk.cold_nnz_hint, torch.ones_like(pk.kept))
    return inp, pk


def run_rows(path: str, key: str, pairs: list[tuple[int, int]], row: Callable[[int, int], dict], **meta) -> None:
    """row(M, nnz) for each pair, printed as it comes (without its per-round times) and written to ``path`` as
    {"environment", **meta, key: [rows]}."""
    result = {"environment": environment(), **meta, key: []}
    for m, nnz in pairs:
        r = row(m, nnz)
        result[key].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "ms_rounds"}), flush=True)
        torch.cuda.empty_cache()  # the row's tensors went with its frame
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
