"""Per-token activation statistics for evaluation: the FFN observer that `sparsify eval` installs.

SparsityTracker (sparsity/stats.py) keeps running means for the training loop; evaluation needs the whole
distribution (p99 of active neurons per token, per-tile counts against TwELL capacities), so this observer keeps,
per layer, the active count of every (token, tile) pair it sees. Memory: tokens × tiles int16 per layer
(131k tokens × 2 tiles × 4 layers ≈ 2 MB for the tiny model).

TwELL capacity (formats/twell.py): a (token, tile) pair holds K = tile // C - 1 entries; a pair with more
non-zeros than K overflows and its row must take the exact fallback path. The overflow fractions here count
exactly the pairs `pack_twell(h, tile, C).tile_overflow` would flag (tests/eval checks it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sparsify_cli.formats.twell import DEFAULT_TILE, check_twell_params

COMPRESSIONS = (8, 4, 2)


def eval_tile(d_ffn: int, preferred: int = DEFAULT_TILE) -> int:
    """The TwELL tile used for the overflow analysis: `preferred` (256, the paper's), or for a narrower layer the
    smallest multiple of 32 that covers it (a single tile), so small models are not analysed as mostly padding."""
    if d_ffn >= preferred:
        return preferred
    return max(32, 32 * math.ceil(d_ffn / 32))


def twell_capacity(tile: int, compression: int) -> int:
    """Entries a (token, tile) pair holds in TwELL v1: tile // C slots, one of them the count."""
    return tile // compression - 1


@dataclass
class _LayerRecord:
    d_ffn: int
    tile: int
    tile_counts: list[torch.Tensor] = field(default_factory=list)  # each (N, n_tiles) int16
    fired: torch.Tensor | None = None  # (H,) bool: fired on at least one token


class ActivationRecorder:
    """Observer (layer_index, h (B, T, H)) -> None that records active counts per token and per TwELL tile.

    Collects only between begin() and end(), like SparsityTracker, so a second model sharing the forward
    (the source of a packed model) cannot mix its activations in by accident.
    """

    def __init__(self, preferred_tile: int = DEFAULT_TILE):
        self.preferred_tile = preferred_tile
        self.layers: dict[int, _LayerRecord] = {}
        self.collecting = False

    def begin(self) -> None:
        self.collecting = True

    def end(self) -> None:
        self.collecting = False

    @torch.no_grad()
    def __call__(self, layer: int, h: torch.Tensor) -> None:
        if not self.collecting:
            return
        width = h.shape[-1]
        rec = self.layers.get(layer)
        if rec is None:
            tile = eval_tile(width, self.preferred_tile)
            check_twell_params(width, tile, min(COMPRESSIONS))
            rec = self.layers[layer] = _LayerRecord(width, tile, fired=torch.zeros(width, dtype=torch.bool))
        elif rec.d_ffn != width:
            raise ValueError(f"layer {layer}: FFN width changed from {rec.d_ffn} to {width} between forwards")
        active = h.detach().reshape(-1, width) != 0  # (N, H)
        n_tiles = math.ceil(width / rec.tile)
        pad = n_tiles * rec.tile - width
        if pad:  # the last tile is narrower: pad it with inactive columns
            active = torch.nn.functional.pad(active, (0, pad))
        per_tile = active.view(-1, n_tiles, rec.tile).sum(-1, dtype=torch.int32)  # (N, n_tiles)
        rec.tile_counts.append(per_tile.to(torch.int16).cpu())
        rec.fired |= active[:, :width].any(0).cpu()

    def n_tokens(self) -> int:
        first = self.layers.get(0)
        return sum(t.shape[0] for t in first.tile_counts) if first else 0

    def layer_reports(self, source_widths: list[int] | None = None) -> list[dict[str, Any]]:
        """One dict per layer with every number `sparsify eval` reports (see layer_report)."""
        reports = []
        for i in sorted(self.layers):
            width = source_widths[i] if source_widths else None
            reports.append(layer_report(i, self.layers[i], width))
        return reports


def layer_report(index: int, rec: _LayerRecord, source_width: int | None = None) -> dict[str, Any]:
    """Statistics of one layer. `source_width`: H before dead neurons were pruned (packed models), used for the
    active fraction so that packed and unpacked models report comparable sparsity."""
    tiles = torch.cat(rec.tile_counts).to(torch.int64)  # (N, n_tiles)
    per_token = tiles.sum(-1)  # (N,)
    n = per_token.numel()
    if n == 0:
        raise ValueError(f"layer {index}: no tokens recorded")
    width = source_width or rec.d_ffn
    dead = int((~rec.fired).sum()) + (width - rec.d_ffn)  # pruned neurons were dead in the source
    pt = per_token.double()
    hist = torch.bincount(per_token, minlength=1)
    overflow = {}
    for c in COMPRESSIONS:
        cap = twell_capacity(rec.tile, c)
        over = tiles > cap  # (N, n_tiles)
        overflow[str(c)] = {
            "capacity": cap,
            "tile_fraction": float(over.double().mean()),  # share of (token, tile) pairs that overflow
            "token_fraction": float(over.any(-1).double().mean()),  # share of tokens needing the fallback path
        }
    return {
        "layer": index,
        "d_ffn": width,
        "d_ffn_run": rec.d_ffn,
        "tokens": n,
        "mean_active": float(pt.mean()),
        "p50_active": _quantile(per_token, 0.5),
        "p99_active": _quantile(per_token, 0.99),
        "max_active": int(per_token.max()),
        "active_fraction": float(pt.mean()) / width,
        "dead": dead,
        "dead_fraction": dead / width,
        "active_hist": hist.tolist(),  # active_hist[k]: tokens with exactly k active neurons
        "tiles": {
            "tile": rec.tile,
            "n_tiles": tiles.shape[1],
            "max_per_tile": int(tiles.max()),
            "p99_per_tile": _quantile(tiles, 0.99),
            "overflow": overflow,
        },
    }


def _quantile(x: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile over all elements (numpy: no size limit, unlike torch.quantile)."""
    return float(np.quantile(x.reshape(-1).numpy(), q))


def model_sparsity(layers: list[dict[str, Any]]) -> dict[str, float]:
    """Model-level numbers: sparsity = 1 - mean over layers of (mean active / H), like sparsity.summarize."""
    mean_fraction = sum(layer["active_fraction"] for layer in layers) / len(layers)
    total = sum(layer["d_ffn"] for layer in layers)
    return {
        "sparsity": 1.0 - mean_fraction,
        "mean_active": sum(layer["mean_active"] for layer in layers) / len(layers),
        "p99_active": max(layer["p99_active"] for layer in layers),
        "max_active": max(layer["max_active"] for layer in layers),
        "dead_fraction": sum(layer["dead"] for layer in layers) / total,
        "overflow_tile_fraction": {
            c: sum(layer["tiles"]["overflow"][c]["tile_fraction"] for layer in layers) / len(layers)
            for c in (str(c) for c in COMPRESSIONS)
        },
    }
