"""AdamW, its learning-rate schedule, and its state as named tensors (for safetensors checkpoints)."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsify_cli.config.schema import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """Weight decay on matrices only: norms and biases are not shrunk toward zero."""
    decay, no_decay = [], []
    for p in _unique_parameters(model).values():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio·lr at max_steps (0-based step)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _unique_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> parameter, each tied parameter once (under its first name)."""
    return dict(model.named_parameters())  # named_parameters() already skips duplicates of tied weights


def optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """AdamW moments keyed 'optim/<param name>/<exp_avg|exp_avg_sq|step>'."""
    names = {id(p): n for n, p in _unique_parameters(model).items()}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"optim/{names[id(p)]}/{key}"] = value
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = _unique_parameters(model)
    for full_key, value in tensors.items():
        if not full_key.startswith("optim/"):
            continue
        name, key = full_key[len("optim/"):].rsplit("/", 1)
        if name not in params:
            raise ValueError(f"optimizer state for unknown parameter {name}")
        p = params[name]
        # AdamW keeps `step` on the CPU unless capturable/fused; the moments live with the parameter.
        optimizer.state[p][key] = value.to(p.device) if key != "step" else value.cpu()
