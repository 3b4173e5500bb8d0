"""AdamW, its learning-rate schedule, and its state as named tensors (for safetensors checkpoints)."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsify_cli.config.schema import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only: norms and biases are not shrunk toward zero."""
    decay, no_decay = [], []
    for p in model.parameters():  # each tied parameter once
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On a GPU the fused kernel does the whole update in one pass over each tensor (the foreach default made ~8% of
    # a paper-shaped training step on the H100). Plain CUDA tensors only: sharded (DTensor) parameters and the CPU
    # keep the default implementation.
    params = decay + no_decay
    fused = bool(params) and all(p.is_cuda and type(p.data) is torch.Tensor for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio·lr at max_steps (0-based step)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def flatten_moments(moments: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{param name: {exp_avg, exp_avg_sq, step}} -> {'optim/<param name>/<key>': tensor} for safetensors."""
    return {
        f"optim/{name}/{key}": value if torch.is_tensor(value) else torch.tensor(value)
        for name, state in moments.items()
        for key, value in state.items()
    }


def unflatten_moments(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for full_key, value in tensors.items():
        if full_key.startswith("optim/"):
            name, key = full_key[len("optim/"):].rsplit("/", 1)
            moments.setdefault(name, {})[key] = value
    return moments
