"""FFN inputs with a chosen activation sparsity, no trained checkpoint needed (the recipe of PERFORMANCE.md).

x ~ N(0, 1) with feature 0 fixed at 1.0; G, U, Down ~ N(0, 0.02²). Neuron j gets a firing rate r_j (log-normal
spread, a fraction of neurons dead, scaled to mean nnz/H, capped at 0.5) and G_j[0] = -σ_j·Φ⁻¹(1 - r_j) with
σ_j = ‖G_j‖ over the other features, so relu(x·G_jᵀ) fires on about r_j of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class FFNInputs:
    x: Tensor  # (M, D)
    gate_w: Tensor  # (H, D)
    up_w: Tensor  # (H, D)
    down_w: Tensor  # (D, H)
    rates: Tensor  # (H,) target firing rates


def firing_rates(n_cols: int, nnz: float, dead: float = 0.3, spread: float = 1.0, cap: float = 0.5,
                 generator: torch.Generator | None = None) -> Tensor:
    """(H,) rates: `dead` of them 0, the rest log-normal(σ=spread), scaled to mean nnz/H, capped at `cap`."""
    r = torch.exp(spread * torch.randn(n_cols, generator=generator, dtype=torch.float64))
    r[torch.rand(n_cols, generator=generator, dtype=torch.float64) < dead] = 0.0
    target = nnz / n_cols
    for _ in range(50):  # rescale, cap, repeat: the cap removes mass, the loop puts it back on the others
        r = (r * target / r.mean()).clamp(max=cap)
    return r


def make_ffn_inputs(n_rows: int, d_model: int, n_cols: int, nnz: float, dead: float = 0.3, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> FFNInputs:
    """Random gated-FFN weights and inputs whose gate fires on about nnz neurons per token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, d_model, generator=gen, dtype=torch.float64)
    x[:, 0] = 1.0
    gate_w = 0.02 * torch.randn(n_cols, d_model, generator=gen, dtype=torch.float64)
    up_w = 0.02 * torch.randn(n_cols, d_model, generator=gen, dtype=torch.float64)
    down_w = 0.02 * torch.randn(d_model, n_cols, generator=gen, dtype=torch.float64)
    rates = firing_rates(n_cols, nnz, dead=dead, generator=gen)
    sigma = gate_w[:, 1:].norm(dim=1)  # (H,)
    p = (1.0 - rates).clamp(max=1.0 - 1e-12)  # dead neurons: Φ⁻¹(1 - 1e-12) ≈ 7σ, practically never fire
    gate_w[:, 0] = -sigma * torch.special.ndtri(p)
    return FFNInputs(x.to(dtype), gate_w.to(dtype), up_w.to(dtype), down_w.to(dtype), rates)
