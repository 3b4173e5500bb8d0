"""Decisions `sparsify pack` takes per layer: which neurons stay, in which order, and the format parameters.

- Dead neurons (no activation on any calibration token) are removed from G, U and Down: the layer gets narrower.
- Order "hot" (the default) sorts the surviving neurons by decreasing firing rate and marks the first n_hot
  (rate above ~1.6%, rounded up to 128) as hot: on a GPU the kernels compute those densely with cuBLAS and only
  the cold rest sparsely (the hybrid path, kernels/ffn.py; BENCHMARKS.md measures it 10-40% faster than all
  sparse). Order "balance" deals the surviving neurons into TwELL tiles so that every tile carries about the same total
  firing rate (greedy, most frequent first, to the tile with the least load so far). A tile's slot count must
  cover its busiest token, so evening out the load lets a higher compression factor fit. "none" keeps the
  trained order.
- The compression factor C is the largest whose capacity (T/C − 1 entries) covers the 99.9th percentile of the
  calibration's per-(token, tile) counts times a safety margin. Covering the maximum instead would let one
  outlier token (often the first of a sequence, which lights up most of layer 0) force C = 2 on a layer that
  needs C = 16 everywhere else. A tile that overflows is computed exactly by the dense fallback for its row,
  so the percentile trades a rare slow row for a fast common case, never accuracy; the manifest records the
  overflow rate on the calibration set.
"""

from __future__ import annotations

import heapq
import math

import torch

COMPRESSIONS = (16, 8, 4, 2)  # tried from the most compact
REORDERS = ("hot", "balance", "none")
# Kept widths are padded to a multiple of this with all-zero neurons (relu(0) = 0: they never fire). A GEMM whose
# output width is not a multiple of 8 loses cuBLAS's aligned bf16 kernels; 64 also keeps tiles whole.
WIDTH_MULTIPLE = 64


def layer_order(fires: torch.Tensor, tokens: int, reorder: str = "hot", preferred_tile: int = 256
                ) -> tuple[torch.Tensor, int, int]:
    """(order, n_hot, tile) of one layer from its calibration firing counts (H,) over `tokens` tokens: the
    surviving neurons in their new order (neuron_order), how many lead as hot, and the TwELL tile of the padded
    width. What `sparsify pack` decides per layer, and what `sparsify bench --suite ffn` applies to its layers."""
    alive = int((fires > 0).sum())
    tile = choose_tile(-(-alive // WIDTH_MULTIPLE) * WIDTH_MULTIPLE, preferred_tile)
    order, n_hot = neuron_order(fires, tile, reorder, tokens)
    return order, n_hot, tile


def pad_width(weights: dict[str, torch.Tensor], multiple: int = WIDTH_MULTIPLE) -> dict[str, torch.Tensor]:
    """Append all-zero neurons (rows) up to a multiple of `multiple`; a "neuron_index" entry gets -1 for them and
    a "down_b" entry (D,), not per neuron, is kept as it is."""
    width = next(t for name, t in weights.items() if name != "down_b").shape[0]
    pad = (-width) % multiple
    if pad == 0:
        return weights
    out = {}
    for name, t in weights.items():
        if name == "down_b":
            out[name] = t
            continue
        fill = -1 if name == "neuron_index" else 0
        out[name] = torch.cat([t, torch.full((pad, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)])
    return out


def choose_tile(width: int, preferred: int = 256) -> int:
    """The TwELL tile width: `preferred`, or the layer's width rounded up to 32 when the layer is narrower."""
    return min(preferred, max(32, math.ceil(width / 32) * 32))


def neuron_order(fires: torch.Tensor, tile: int, reorder: str, tokens: int = 1) -> tuple[torch.Tensor, int]:
    """(order, n_hot): indices of the surviving (ever-firing) neurons in their new order (H',) int64, and how
    many of the first ones are hot (0 unless reorder == "hot"); `tokens` turns firing counts into rates."""
    alive = (fires > 0).nonzero().flatten()
    if reorder == "none" or alive.numel() == 0:
        return alive, 0
    if reorder == "hot":
        from sparsify_cli.kernels.ffn import hot_first_order

        perm, n_hot = hot_first_order(fires[alive].double() / max(tokens, 1))
        return alive[perm], n_hot
    if reorder != "balance":
        raise ValueError(f"reorder must be one of {', '.join(REORDERS)}, got {reorder!r}")
    width = alive.numel()
    n_tiles = math.ceil(width / tile)
    room = [min(tile, width - t * tile) for t in range(n_tiles)]  # the last tile may be narrower
    heap = [(0, t) for t in range(n_tiles)]  # (load, tile)
    members: list[list[int]] = [[] for _ in range(n_tiles)]
    by_rate = alive[torch.argsort(fires[alive], descending=True, stable=True)].tolist()
    for neuron in by_rate:
        load, t = heapq.heappop(heap)
        members[t].append(neuron)
        if len(members[t]) < room[t]:
            heapq.heappush(heap, (load + int(fires[neuron]), t))
    # Within a tile keep the trained order: neighbouring rows of U/Down stay neighbours in memory.
    return torch.tensor([n for tile_members in members for n in sorted(tile_members)], dtype=torch.int64), 0


COVER_QUANTILE = 0.999


def hist_quantile(hist: torch.Tensor, q: float) -> int:
    """Smallest k such that a fraction >= q of the (token, tile) pairs have at most k active neurons."""
    total = int(hist.sum())
    if total == 0:
        return 0
    cdf = torch.cumsum(hist, 0).double() / total
    return int((cdf >= q - 1e-12).nonzero()[0])


def choose_compression(tile: int, hist: torch.Tensor, margin: float) -> int:
    """The most compact C whose capacity covers ceil(q99.9·margin) entries per tile; C = 2 if none does."""
    need = math.ceil(hist_quantile(hist, COVER_QUANTILE) * margin)
    for c in COMPRESSIONS:
        if tile % c == 0 and tile // c >= 2 and tile // c - 1 >= need:
            return c
    return 2


def overflow_fraction(hist: torch.Tensor, capacity: int) -> float:
    """Share of (token, tile) pairs with more active neurons than `capacity`."""
    total = int(hist.sum())
    return float(hist[capacity + 1:].sum()) / total if total else 0.0


def ell_width(max_per_token: int, margin: float) -> int:
    """Hybrid-ELL row width for training: the busiest token times the margin, rounded up to 32."""
    return max(32, math.ceil(max_per_token * margin / 32) * 32)
