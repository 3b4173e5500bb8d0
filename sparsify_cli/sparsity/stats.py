"""Activation statistics collected while the model runs: the L1 term, active neurons per token, dead neurons.

A SparsityTracker is the FFN observer (model/ffn.py) during training and evaluation. It is only `collecting`
between begin_forward() and end_forward(), so a forward recomputed inside backward (activation checkpointing)
is not counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify_cli.sparsity.penalty import layer_l1


@dataclass
class LayerStats:
    """Per-layer statistics over the tokens seen since the last reset."""

    mean_active: float  # mean number of non-zero h_j per token
    max_active: int  # most non-zero h_j in any one token
    dead_fraction: float  # neurons that fired on none of the last `window` tokens
    d_ffn: int


class SparsityTracker:
    def __init__(
        self, n_layers: int, d_ffn: int, dead_window_tokens: int, device: torch.device | str = "cpu", token_scale: int = 1
    ):
        self.n_layers, self.d_ffn, self.window = n_layers, d_ffn, dead_window_tokens
        # With N data-parallel processes each forward sees 1/N of the tokens; the dead-neuron clock counts
        # global tokens (local × token_scale) so a window means the same thing as on one process.
        self.token_scale = token_scale
        self.collecting = False
        self.want_l1 = True
        self.l1_terms: list[torch.Tensor] = []
        # Dead-neuron clock: tokens seen in total and, per layer and neuron, the token count when it last fired.
        # A neuron is dead once tokens_seen - last_fired >= window (nothing can be dead before `window` tokens).
        self.tokens_seen = 0
        self.last_fired = torch.zeros(n_layers, d_ffn, dtype=torch.int64, device=device)
        self._pending_tokens = 0
        self.reset_window_stats()
        self._reset_step_stats()

    # ---- observer protocol -------------------------------------------------------------------------------
    def begin_forward(self, want_l1: bool = True) -> None:
        self.collecting, self.want_l1 = True, want_l1
        self.l1_terms = []

    def end_forward(self) -> torch.Tensor | None:
        """Stop collecting; return the L1 term averaged over layers (None when not requested)."""
        self.collecting = False
        if self._pending_tokens:
            self.tokens_seen += self._pending_tokens
            self._pending_tokens = 0
        if not self.want_l1 or not self.l1_terms:
            return None
        return torch.stack(self.l1_terms).mean()

    def __call__(self, layer: int, h: torch.Tensor) -> None:
        if not self.collecting:
            if self.want_l1 and torch.is_grad_enabled() and h.requires_grad:
                # A forward recomputed inside backward (activation checkpointing) must save the same tensors
                # as the original one, which computed the L1 term here: compute it again, count nothing.
                layer_l1(h)
            return
        with torch.no_grad():
            active = h.detach().reshape(-1, h.shape[-1]) != 0  # (N, H)
            per_token, fired = active.sum(-1), active.any(0)  # (N,), (H,)
        self._record(layer, layer_l1(h) if self.want_l1 else None, per_token, fired)

    def observe_sparse(self, layer: int, l1: torch.Tensor, token_counts: torch.Tensor, neuron_counts: torch.Tensor) -> None:
        """The sparse training path's call (model/ffn.py): the L1 term and active counts instead of h.

        l1 = layer_l1(h) with its gradient; token_counts (N,) and neuron_counts (H,) count non-zero h.
        """
        if not self.collecting:
            return
        self._record(layer, l1.float() if self.want_l1 else None, token_counts, neuron_counts > 0)

    def _record(self, layer: int, l1: torch.Tensor | None, per_token: torch.Tensor, fired: torch.Tensor) -> None:
        if l1 is not None:
            self.l1_terms.append(l1)
        with torch.no_grad():
            n = per_token.numel()
            n_clock = n * self.token_scale
            if n:  # tensors, not .item(): no host sync per layer on a GPU
                active = per_token.sum()
                self._active_sum[layer] += active
                self._active_max[layer] = torch.maximum(self._active_max[layer], per_token.max())
                self._step_active_sum[layer] += active
            self._tokens[layer] += n
            self._step_tokens[layer] += n
            # The tokens of this forward count as seen once it ends; a neuron that fired here was alive "now".
            self.last_fired[layer, fired] = self.tokens_seen + n_clock
            if layer == 0:
                self._pending_tokens += n_clock

    # ---- reading and resetting -------------------------------------------------------------------------
    def reset_window_stats(self) -> None:
        """Start a new logging window for mean/max active (the dead-neuron clock keeps running)."""
        device = self.last_fired.device
        self._active_sum = torch.zeros(self.n_layers, dtype=torch.float64, device=device)
        self._active_max = torch.zeros(self.n_layers, dtype=torch.int64, device=device)
        self._tokens = [0] * self.n_layers

    def _reset_step_stats(self) -> None:
        self._step_active_sum = torch.zeros(self.n_layers, dtype=torch.float64, device=self.last_fired.device)
        self._step_tokens = [0] * self.n_layers

    def step_mean_active(self) -> list[float] | None:
        """Per-layer mean active neurons per token over the forwards since the previous call, then restart.

        Called once per optimizer step, that is the previous step's statistics (all its micro-batches), over
        every process's tokens, as layer_stats().mean_active would count them (one all-reduce, one host sync).
        The sums are integer counts held exactly in float64, so every process gets the same numbers. None when
        no token was seen since the previous call (the first step, right after a resume); a layer that saw no
        token is NaN.
        """
        device = self._step_active_sum.device
        sums = torch.stack([self._step_active_sum, torch.tensor(self._step_tokens, dtype=torch.float64, device=device)])
        self._reset_step_stats()
        if _world() > 1:
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
        active, tokens = sums.tolist()  # (2, n_layers)
        if not any(tokens):
            return None
        return [a / t if t else float("nan") for a, t in zip(active, tokens)]

    def sync_clock(self) -> None:
        """Data-parallel: take, per neuron, the latest firing seen by any process (a no-op on one process)."""
        if _world() > 1:
            torch.distributed.all_reduce(self.last_fired, op=torch.distributed.ReduceOp.MAX)

    def dead_mask(self) -> torch.Tensor:
        """(n_layers, d_ffn) bool: neurons silent over the last `window` tokens."""
        if self.tokens_seen < self.window:
            return torch.zeros_like(self.last_fired, dtype=torch.bool)
        return (self.tokens_seen - self.last_fired) >= self.window

    def layer_stats(self) -> list[LayerStats]:
        self.sync_clock()
        dead = self.dead_mask().float().mean(-1).tolist()
        active_sum, active_max = self._active_sum.clone(), self._active_max.clone()
        tokens = torch.tensor(self._tokens, dtype=torch.float64, device=active_sum.device)
        if _world() > 1:  # statistics of all processes' tokens, as one process would have seen them
            for t, op in ((active_sum, "SUM"), (active_max, "MAX"), (tokens, "SUM")):
                torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
        active_sum, active_max, tokens = active_sum.tolist(), active_max.tolist(), tokens.tolist()
        return [
            LayerStats(
                mean_active=active_sum[i] / max(tokens[i], 1),
                max_active=int(active_max[i]),
                dead_fraction=dead[i],
                d_ffn=self.d_ffn,
            )
            for i in range(self.n_layers)
        ]

    def revive(self, layer: int, neurons: torch.Tensor) -> None:
        """Restart the clock of re-initialized neurons so they get a full window to fire."""
        self.last_fired[layer, neurons] = self.tokens_seen

    def state_dict(self) -> dict:
        return {"tokens_seen": self.tokens_seen, "last_fired": self.last_fired.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_seen = int(state["tokens_seen"])
        self.last_fired = state["last_fired"].to(self.last_fired.device, torch.int64)


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def summarize(stats: list[LayerStats]) -> dict[str, float]:
    """Model-level numbers for the progress bar and logs: sparsity = 1 - mean active / H."""
    mean_active = sum(s.mean_active for s in stats) / len(stats)
    return {
        "active_mean": mean_active,
        "active_max": max(s.max_active for s in stats),
        "sparsity": 1.0 - mean_active / stats[0].d_ffn,
        "dead_fraction": sum(s.dead_fraction for s in stats) / len(stats),
    }
