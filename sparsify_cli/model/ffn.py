"""Feed-forward blocks whose activations h are the object of sparsity.

gated: h = act(x·Gᵀ) ⊙ (x·Uᵀ), out = h·Downᵀ      plain: h = act(x·Uᵀ), out = h·Downᵀ
With act = ReLU, h is exactly zero wherever the gate (or the up projection, for plain) is ≤ 0, and the L1 term
on h pushes most of it there. Each forward hands h to an optional observer (L1 term, statistics), so the
sparsity code needs no hooks into the model.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparsify_cli.config.schema import ModelConfig

# Called with (layer_index, h) where h is (B, T, H); returns nothing. Set by the training loop / eval.
ActivationObserver = Callable[[int, torch.Tensor], None]

_ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.gated = cfg.ffn == "gated"
        self.activation = cfg.activation
        self.act = _ACTIVATIONS[cfg.activation]
        d, h = cfg.d_model, cfg.d_ffn
        self.gate = nn.Linear(d, h, bias=cfg.mlp_bias) if self.gated else None
        self.up = nn.Linear(d, h, bias=cfg.mlp_bias)
        self.down = nn.Linear(h, d, bias=cfg.mlp_bias)
        self.observer: Optional[ActivationObserver] = None

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """h for input x: (B, T, D) -> (B, T, H)."""
        if self.gated:
            return self.act(self.gate(x)) * self.up(x)
        return self.act(self.up(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.activations(x)  # (B, T, H)
        if self.observer is not None:
            self.observer(self.layer_index, h)
        return self.down(h)  # (B, T, D)
