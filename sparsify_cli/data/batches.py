"""Batches of token windows: random ones for training, fixed ones for held-out evaluation.

Training windows are drawn by a generator seeded with (seed, index of the batch), not by one long-lived
generator: batch k is a pure function of (tokens, seed, k), so resuming from a checkpoint needs to store only
how many batches were drawn, and the resumed run sees exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from sparsify_cli.errors import UserError


def _check_sizes(tokens: np.ndarray, batch_size: int, seq_len: int, what: str) -> None:
    if batch_size <= 0 or seq_len <= 0:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    if len(tokens) < seq_len + 1:
        raise UserError(
            f"the {what} split has {len(tokens)} tokens, fewer than train.seq_len + 1 = {seq_len + 1}; "
            f"use more text or a shorter train.seq_len"
        )


def _to_xy(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, T+1)
    windows = torch.from_numpy(tokens[idx].astype(np.int64))  # (B, T+1); copies out of the memmap
    return windows[:, :-1], windows[:, 1:]  # x (B, T), y (B, T): y[t] is the token after x[t]


class BatchSampler:
    """Random windows of seq_len + 1 tokens, deterministic in (seed, batches drawn) and resumable."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, what: str = "train"):
        _check_sizes(tokens, batch_size, seq_len, what)
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed = seed
        self.batches_drawn = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: LongTensor (B, T) with y = x shifted left by one token."""
        # SeedSequence takes a list of non-negative ints; distinct (seed, k) pairs give independent streams.
        rng = np.random.default_rng([self.seed % 2**64, self.batches_drawn])
        # (B,); the largest start, len - T - 1, still leaves room for T + 1 tokens
        starts = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        self.batches_drawn += 1
        return _to_xy(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off; batch size and seq_len stay those given to the constructor."""
        try:
            seed, drawn = state["seed"], state["batches_drawn"]
        except (KeyError, TypeError):
            raise UserError(f"sampler state {state!r} lacks 'seed' or 'batches_drawn': the checkpoint is damaged") from None
        if not (isinstance(seed, int) and isinstance(drawn, int) and drawn >= 0):
            raise UserError(f"sampler state {state!r}: 'seed' and 'batches_drawn' must be integers (drawn >= 0)")
        self.seed, self.batches_drawn = seed, drawn


def eval_batches(
    tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous, non-overlapping windows from the start of `tokens`, the same on every call.

    Window i holds tokens [i·T, i·T + T] (x and its shifted y); up to max_batches batches of batch_size windows,
    the last batch smaller when the windows run out.
    """
    _check_sizes(tokens, batch_size, seq_len, "held-out")
    if max_batches <= 0:
        raise ValueError(f"max_batches={max_batches} must be positive")
    n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len  # (B,)
        yield _to_xy(tokens, starts, seq_len)
