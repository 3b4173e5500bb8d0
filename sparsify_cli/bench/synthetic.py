"""Inputs with a chosen activation sparsity, no trained checkpoint needed (PERFORMANCE.md's recipe).

x ~ N(0, 1) with feature 0 fixed at 1.0; G, U, Down ~ N(0, 0.02²). Each neuron j gets a firing rate r_j: a
log-normal spread (sigma = ``spread``) with ``dead_frac`` of the neurons at 0, scaled so the mean is nnz/H and
capped at 0.5. With sigma_j = ‖G_j‖ over the other features, G_j[0] = -sigma_j·Φ⁻¹(1 - r_j), so that
relu(x·G_jᵀ) fires on about r_j of the tokens (dead neurons get -8·sigma_j: they never fire in practice).

Weights use torch.nn.Linear's convention: gate and up are [H, D] (out = x @ W.T), down is [D, H].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FFNInputs:
    x: torch.Tensor  # (M, D)
    gate: torch.Tensor  # (H, D)
    up: torch.Tensor  # (H, D)
    down: torch.Tensor  # (D, H)
    rates: torch.Tensor  # (H,) target firing rate per neuron (fp32)


def firing_rates(
    hidden: int, nnz: float, *, dead_frac: float = 0.3, spread: float = 1.5, cap: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(H,) fp32 rates: ``dead_frac`` zeros, the rest log-normal, mean nnz/H, each capped at ``cap``."""
    if not 0 < nnz < hidden * cap * (1 - dead_frac):
        raise ValueError(f"nnz={nnz} is not reachable with H={hidden}, cap={cap}, dead_frac={dead_frac}")
    n_dead = int(round(dead_frac * hidden))
    perm = torch.randperm(hidden, generator=generator)
    logr = torch.randn(hidden, generator=generator, dtype=torch.float64) * spread
    raw = torch.exp(logr)
    raw[perm[:n_dead]] = 0.0
    target = nnz / hidden
    rates = raw
    scale = 1.0
    for _ in range(100):  # rescale until the mean after capping is on target
        rates = torch.clamp(raw * scale, max=cap)
        mean = rates.mean().item()
        if abs(mean - target) < 1e-9 * max(target, 1e-12):
            break
        scale *= target / mean
    return rates.float()


def make_ffn_inputs(
    tokens: int, d_model: int, hidden: int, nnz: float, *, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16, seed: int = 0, dead_frac: float = 0.3, spread: float = 1.5,
) -> FFNInputs:
    """Random FFN inputs whose gate activation has about ``nnz`` active neurons per token."""
    gen = torch.Generator().manual_seed(seed)
    rates = firing_rates(hidden, nnz, dead_frac=dead_frac, spread=spread, generator=gen)
    dgen = torch.Generator(device=device).manual_seed(seed + 1)
    gate = torch.randn(hidden, d_model, generator=dgen, device=device, dtype=torch.float32) * 0.02
    up = torch.randn(hidden, d_model, generator=dgen, device=device, dtype=torch.float32) * 0.02
    down = torch.randn(d_model, hidden, generator=dgen, device=device, dtype=torch.float32) * 0.02
    # Round the "other features" to the working dtype first so sigma_j matches what the GEMM sees.
    gate = gate.to(dtype).float()
    sigma = gate[:, 1:].norm(dim=1)  # (H,)
    r = rates.to(device=device, dtype=torch.float64).clamp(min=1e-300)
    z = torch.special.ndtri(1.0 - r).float()  # Φ⁻¹(1 - r_j)
    z = torch.where(rates.to(device) > 0, z, torch.full_like(z, 8.0))
    gate[:, 0] = -sigma * z
    x = recipe_tokens(tokens, d_model, dgen, device=device, dtype=dtype)
    return FFNInputs(
        x=x, gate=gate.to(dtype), up=up.to(dtype), down=down.to(dtype), rates=rates.to(device)
    )


def recipe_tokens(tokens: int, d_model: int, generator: torch.Generator, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(tokens, d_model) inputs of the recipe: N(0, 1) with feature 0 fixed at 1.0 (the feature the gate rows'
    thresholds sit on). They do not depend on the weights, so they also serve as calibration tokens."""
    x = torch.randn(tokens, d_model, generator=generator, device=device, dtype=torch.float32)
    x[:, 0] = 1.0
    return x.to(dtype)
