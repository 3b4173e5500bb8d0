"""The paper's L1 term on FFN activations and its coefficient schedule."""

from __future__ import annotations

import torch


def layer_l1(h: torch.Tensor) -> torch.Tensor:
    """Σ_j |h_j| over the H neurons, averaged over tokens: h (..., H) -> scalar (fp32)."""
    return h.float().abs().sum(-1).mean()


def l1_coefficient(step: int, l1_coeff: float, warmup_steps: int) -> float:
    """λ at optimizer step `step` (0-based): a linear ramp from 0 over warmup_steps, then l1_coeff."""
    if warmup_steps <= 0:
        return l1_coeff
    return l1_coeff * min(1.0, step / warmup_steps)
