"""Calibration: run the model over held-out text and record, per FFN layer, how its neurons fire.

Two kinds of record, because the second depends on decisions taken from the first:
- NeuronRecord (pass 1): per-neuron firing counts and per-token active counts → dead neurons, the new neuron
  order, mean/p99/max active per token.
- TileRecord (pass 2, after pruning and reordering): per-(token, tile) active counts under the final layout →
  the TwELL compression factor that covers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from sparsify_cli.model.transformer import SparseLlama


@dataclass
class NeuronRecord:
    fires: torch.Tensor  # (H,) int64: tokens on which each neuron was active
    per_token: list[torch.Tensor] = field(default_factory=list)  # chunks of (N,) int32 active counts
    tokens: int = 0

    def token_counts(self) -> torch.Tensor:
        return torch.cat(self.per_token) if self.per_token else torch.zeros(0, dtype=torch.int32)


@dataclass
class TileRecord:
    tile: int
    max_per_tile: int = 0  # the most active neurons seen in one (token, tile)
    hist: torch.Tensor | None = None  # (tile + 1,) int64: how many (token, tile) pairs had k active
    max_per_token: int = 0


def _run(model: SparseLlama, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], observer: Callable) -> int:
    """Forward every batch with `observer` on the FFNs; return the number of tokens seen."""
    model.eval()
    model.set_observer(observer)
    seen = 0
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x.to(next(model.parameters()).device))
                seen += x.numel()
    finally:
        model.set_observer(None)
    return seen


def record_neurons(model: SparseLlama, batches) -> list[NeuronRecord]:
    records = [NeuronRecord(torch.zeros(f.up.out_features, dtype=torch.int64)) for f in model.ffns]

    def observe(layer: int, h: torch.Tensor) -> None:
        active = h.reshape(-1, h.shape[-1]) != 0  # (N, H)
        rec = records[layer]
        rec.fires += active.sum(0).cpu()
        rec.per_token.append(active.sum(1, dtype=torch.int32).cpu())
        rec.tokens += active.shape[0]

    if _run(model, batches, observe) == 0:
        raise ValueError("no calibration tokens")
    return records


def record_tiles(model: SparseLlama, batches, tiles: list[int]) -> list[TileRecord]:
    """Per-(token, tile) active counts of each layer under its current neuron order and tile width."""
    records = [TileRecord(t, hist=torch.zeros(t + 1, dtype=torch.int64)) for t in tiles]

    def observe(layer: int, h: torch.Tensor) -> None:
        rec = records[layer]
        active = (h.reshape(-1, h.shape[-1]) != 0).to(torch.int32)  # (N, H)
        n, width = active.shape
        pad = (-width) % rec.tile
        if pad:
            active = torch.nn.functional.pad(active, (0, pad))
        per_tile = active.view(n, -1, rec.tile).sum(-1)  # (N, n_tiles)
        rec.max_per_tile = max(rec.max_per_tile, int(per_tile.max()) if per_tile.numel() else 0)
        rec.max_per_token = max(rec.max_per_token, int(per_tile.sum(1).max()) if n else 0)
        rec.hist += torch.bincount(per_tile.flatten().cpu(), minlength=rec.tile + 1)

    _run(model, batches, observe)
    return records
