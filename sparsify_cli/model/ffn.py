"""Feed-forward blocks whose activations h are the object of sparsity.

gated: h = act(x·Gᵀ) ⊙ (x·Uᵀ), out = h·Downᵀ      plain: h = act(x·Uᵀ), out = h·Downᵀ
With act = ReLU, h is exactly zero wherever the gate (or the up projection, for plain) is ≤ 0, and the L1 term
on h pushes most of it there. Each forward hands h to an optional observer (L1 term, statistics), so the
sparsity code needs no hooks into the model.

Sparse training path (off by default: FeedForward.sparse_train = False; the training loop's per-layer policy,
train/ffn_kernels.py, switches it with train.kernels=cuda). When on, the block runs
kernels.train_reference.sparse_ffn_train, which never forms the dense h: it returns the output, the L1 term and
the active counts, and the observer gets those through its optional `observe_sparse` method instead of h. An
observer without that method needs h itself (eval's recorder, the divergence probe): that forward takes the dense
path, which computes the same function. docs/TRAINING_KERNELS.md describes the op.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.kernels.train_reference import DEFAULT_WIDTH, sparse_ffn_train

# Called with (layer_index, h) where h is (B, T, H); returns nothing. Set by the training loop / eval.
# The sparse training path calls observer.observe_sparse(layer_index, l1, token_counts, neuron_counts) instead,
# where the observer has it: l1 = layer_l1(h) (scalar, carries the gradient), token_counts (B·T,) and
# neuron_counts (H,) = non-zero h per token / per neuron (int64, no gradient).
ActivationObserver = Callable[[int, torch.Tensor], None]

_ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


class FeedForward(nn.Module):
    # The sparse training path (module docstring). Class defaults; set per instance to switch a layer.
    sparse_train: bool = False
    sparse_backend: Optional[str] = None  # a key of kernels.train_reference.TRAIN_BACKENDS; None: its default
    sparse_width: int = DEFAULT_WIDTH  # ELL width of the hybrid pattern (rows above it take the dense tail)

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
        # The busiest neurons at the previous sparse call (kernels/train_cuda.py HotSet): the CUDA op computes them
        # with dense GEMMs over their columns (a speed hint only: the result does not depend on it). Each call's
        # neuron counts travel to the host in the background (PendingHot) and become the hot set at the next
        # collecting forward, so a forward recomputed in backward (activation checkpointing) uses the same hot
        # set, hence saves tensors of the same shapes, as the original one.
        self.sparse_hot = None  # Optional[HotSet]
        self._hot_next = None  # Optional[PendingHot]

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """h for input x: (B, T, D) -> (B, T, H)."""
        if self.gated:
            return self.act(self.gate(x)) * self.up(x)
        return self.act(self.up(x))

    # Never traced by torch.compile (train.compile, train/compile.py): the sparse path waits on the host for the
    # pattern's size and keeps the hot-set hint between calls, and both paths call the Python observer.
    @torch.compiler.disable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse_train:
            observe = getattr(self.observer, "observe_sparse", None)
            if self.observer is None or observe is not None:
                return self._sparse_forward(x, observe)
        h = self.activations(x)  # (B, T, H)
        if self.observer is not None:
            self.observer(self.layer_index, h)
        return self.down(h)  # (B, T, D)

    def _hot_for(self, x: torch.Tensor):
        hot = self.sparse_hot
        if self.sparse_backend != "cuda" or hot is None or hot.skip.device != x.device or hot.h != self.up.out_features:
            return None
        return hot

    def _sparse_forward(self, x: torch.Tensor, observe: Optional[Callable]) -> torch.Tensor:
        """The sparse training op on x (B, T, D) -> (B, T, D), in the dtype nn.Linear would compute in."""
        if self.activation != "relu":
            raise ValueError(
                f"FeedForward.sparse_train needs activation='relu' (layer {self.layer_index} uses "
                f"{self.activation!r}): the sparse path relies on the exact zeros of the ReLU"
            )
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype

        def param(linear: Optional[nn.Linear], name: str) -> Optional[torch.Tensor]:
            t = None if linear is None else getattr(linear, name)
            return None if t is None else t.to(dtype)

        # the original forward of a training step (not a recomputation inside backward, not evaluation)
        fresh = self.training and self.sparse_backend == "cuda" and getattr(self.observer, "collecting", True)
        if fresh and self._hot_next is not None:
            self.sparse_hot, self._hot_next = self._hot_next.resolve(), None
        res = sparse_ffn_train(
            x.reshape(-1, x.shape[-1]).to(dtype),  # (M, D)
            param(self.gate, "weight"), param(self.up, "weight"), param(self.down, "weight"),
            param(self.gate, "bias"), param(self.up, "bias"), param(self.down, "bias"),
            width=self.sparse_width, backend=self.sparse_backend, hot=self._hot_for(x),
        )
        if fresh:
            from sparsify_cli.kernels.train_cuda import PendingHot

            self._hot_next = PendingHot(res.neuron_counts, res.token_counts.shape[0])
        if observe is not None:
            observe(self.layer_index, res.l1, res.token_counts, res.neuron_counts)
        return res.out.reshape(*x.shape[:-1], res.out.shape[-1])  # (B, T, D)
