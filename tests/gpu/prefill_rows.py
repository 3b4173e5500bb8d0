"""What the prefill development tools share (hot_tune.py, hybrid_order.py): the shapes to time, from an
environment variable, and the loop that times one row per shape, prints it and writes the JSON."""

from __future__ import annotations

import json
import os
from typing import Callable

import torch

from sparsify_cli.bench.ffn import environment


def shapes(env: str, default: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(M, nnz) pairs from ``env`` ("65536x29,16384x29"), else ``default``."""
    spec = os.environ.get(env)
    if not spec:
        return default
    return [tuple(int(v) for v in s.split("x")) for s in spec.split(",")]


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
