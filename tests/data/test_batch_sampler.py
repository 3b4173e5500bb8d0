"""Training windows (deterministic, resumable) and held-out windows (fixed, contiguous)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsify_cli.data import BatchSampler, eval_batches
from sparsify_cli.errors import UserError

TOKENS = np.arange(1000, dtype=np.uint16)  # token i is i, so a window's content gives its start away


def test_windows_are_slices_with_y_shifted_by_one():
    x, y = BatchSampler(TOKENS, batch_size=8, seq_len=16, seed=0).next_batch()
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    starts = x[:, 0]
    assert torch.equal(x, starts[:, None] + torch.arange(16))
    assert torch.equal(y, x + 1)


def test_starts_cover_the_whole_array_and_stay_inside():
    tokens = np.arange(20, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=64, seq_len=15, seed=3)
    starts = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(10)])
    assert set(starts.tolist()) == set(range(5))  # 20 tokens hold windows of 16 at starts 0..4


def test_resume_gives_the_batches_an_uninterrupted_run_would():
    uninterrupted = BatchSampler(TOKENS, 4, 32, seed=7)
    expected = [uninterrupted.next_batch() for _ in range(6)]
    first = BatchSampler(TOKENS, 4, 32, seed=7)
    for _ in range(2):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # as stored in a checkpoint
    resumed = BatchSampler(TOKENS, 4, 32, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    for want_x, want_y in expected[2:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert resumed.state_dict() == {"seed": 7, "batches_drawn": 6}


def test_seeds_and_batches_differ():
    a, b = BatchSampler(TOKENS, 8, 16, seed=0), BatchSampler(TOKENS, 8, 16, seed=1)
    a1, a2, b1 = a.next_batch()[0], a.next_batch()[0], b.next_batch()[0]
    assert not torch.equal(a1, a2) and not torch.equal(a1, b1)
    assert torch.equal(BatchSampler(TOKENS, 8, 16, seed=0).next_batch()[0], a1)


def test_memmap_tokens(tmp_path):
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(len(TOKENS),))
    x, _ = BatchSampler(tokens, 2, 8, seed=0).next_batch()
    assert torch.equal(x, BatchSampler(TOKENS, 2, 8, seed=0).next_batch()[0])


def test_too_few_tokens_is_a_user_error():
    BatchSampler(np.arange(17, dtype=np.uint16), 2, 16, seed=0).next_batch()  # exactly seq_len + 1 is enough
    with pytest.raises(UserError, match=r"has 16 tokens, fewer than train\.seq_len \+ 1 = 17"):
        BatchSampler(np.arange(16, dtype=np.uint16), 2, 16, seed=0)
    with pytest.raises(UserError, match=r"held-out split has 16 tokens"):
        next(eval_batches(np.arange(16, dtype=np.uint16), 2, 16, max_batches=1))


BAD_STATES = [{}, {"seed": 1}, {"seed": "1", "batches_drawn": 2}, {"seed": 1, "batches_drawn": -1}, None]


@pytest.mark.parametrize("state", BAD_STATES)
def test_damaged_sampler_state_is_refused(state):
    with pytest.raises(UserError, match="sampler state"):
        BatchSampler(TOKENS, 2, 8, seed=0).load_state_dict(state)


def test_eval_batches_are_contiguous_and_fixed():
    batches = list(eval_batches(TOKENS, batch_size=4, seq_len=10, max_batches=3))
    assert len(batches) == 3
    x = torch.cat([bx for bx, _ in batches])  # (12, 10)
    assert torch.equal(x, torch.arange(120).view(12, 10))  # windows 0..11, no overlap, no gap
    assert torch.equal(torch.cat([by for _, by in batches]), x + 1)
    again = list(eval_batches(TOKENS, batch_size=4, seq_len=10, max_batches=3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_eval_batches_stop_when_windows_run_out():
    tokens = np.arange(56, dtype=np.uint16)  # 55 usable targets: 5 windows of 10
    shapes = [x.shape for x, _ in eval_batches(tokens, batch_size=2, seq_len=10, max_batches=100)]
    assert shapes == [(2, 10), (2, 10), (1, 10)]
    last_y = list(eval_batches(tokens, 2, 10, 100))[-1][1]
    assert int(last_y[-1, -1]) == 50  # the window [40, 50] ends inside the array
