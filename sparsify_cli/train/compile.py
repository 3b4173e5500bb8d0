"""train.compile: torch.compile around everything in a training step but the FFN blocks.

A training step of a paper-shaped model spends a large share of its GPU time outside the matrix products: fp32
residual adds, RMSNorm, rotary, casts and strided copies around attention, the fp32 copy of the logits for the
loss. Compiling each decoder block fuses those passes (and the loss's cast into its log-softmax), for dense and
sparse FFNs alike.

The FFN blocks stay eager (FeedForward.forward is excluded from compilation, model/ffn.py): their sparse path
waits on the host for the pattern's size and keeps a hot-set hint between calls, and both paths hand their
activations to a Python observer (the L1 term and statistics). So a compiled block is two graphs with the FFN
between them, and switching a layer between the dense and sparse paths (train.kernels=cuda) recompiles nothing.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsify_cli.errors import UserError

# The torch.compile backend. Inductor generates the fused kernels (Triton on a GPU, C++ on the CPU); tests run
# the same wiring with "eager" (graph capture only), which needs neither.
BACKEND = "inductor"


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss's CE: logits (B, T, V) in fp32 against targets (B, T), mean over tokens."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def check_can_compile(device: torch.device) -> None:
    """Stop before any work when torch.compile's backend cannot build kernels for `device`."""
    if BACKEND != "inductor":
        return
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError(
                "train.compile=true needs Triton for this GPU (pip install triton, compute capability 7.0 or "
                "newer); or train with train.compile=false"
            )
    elif not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "clang++", "c++"))):
        raise UserError("train.compile=true on the CPU needs a C++ compiler (g++ or clang++, or set CXX)")


def compile_blocks(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Compile each decoder block of `model` (a SparseLlama, possibly sharded by FSDP2) in place; return the
    compiled loss function to use in place of cross_entropy."""
    for block in model.blocks:
        block.compile(backend=BACKEND)
    return torch.compile(cross_entropy, backend=BACKEND)
