import torch

from sparsify_cli.sparsity import SparsityTracker, l1_coefficient, layer_l1, summarize


def test_l1_term_against_hand_computation():
    h = torch.tensor([[[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]]])  # (B=1, T=2, H=3)
    # per token: |1|+|-2|+0 = 3 and 3; mean over tokens = 3
    assert layer_l1(h).item() == 3.0
    tracker = SparsityTracker(n_layers=2, d_ffn=3, dead_window_tokens=100)
    tracker.begin_forward()
    tracker(0, h)
    tracker(1, 2 * h)  # layer 1: 6
    assert tracker.end_forward().item() == 4.5  # mean over layers


def test_l1_schedule_ramps_linearly():
    assert l1_coefficient(0, 1e-3, 10) == 0.0
    assert abs(l1_coefficient(5, 1e-3, 10) - 5e-4) < 1e-12
    assert l1_coefficient(10, 1e-3, 10) == l1_coefficient(50, 1e-3, 10) == 1e-3
    assert l1_coefficient(0, 1e-3, 0) == 1e-3


def test_active_counts_and_dead_neurons():
    tracker = SparsityTracker(n_layers=1, d_ffn=4, dead_window_tokens=4)
    h = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]])  # tokens with 1 and 2 active
    for _ in range(2):
        tracker.begin_forward(want_l1=False)
        tracker(0, h)
        assert tracker.end_forward() is None
    (stats,) = tracker.layer_stats()
    assert stats.mean_active == 1.5 and stats.max_active == 2
    assert stats.dead_fraction == 0.5  # neurons 2, 3 never fired over the last 4 tokens
    # neuron 1 stops firing: dead once a full window (4 tokens) has passed without it
    h2 = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    tracker.begin_forward(want_l1=False); tracker(0, h2); tracker.end_forward()
    assert tracker.dead_mask()[0].tolist() == [False, False, True, True]
    tracker.begin_forward(want_l1=False); tracker(0, h2); tracker.end_forward()
    assert tracker.dead_mask()[0].tolist() == [False, True, True, True]
    s = summarize(tracker.layer_stats())
    assert abs(s["sparsity"] - (1 - s["active_mean"] / 4)) < 1e-12


def test_nothing_is_dead_before_a_full_window():
    tracker = SparsityTracker(n_layers=1, d_ffn=3, dead_window_tokens=10)
    tracker.begin_forward(); tracker(0, torch.zeros(4, 3)); tracker.end_forward()
    assert not tracker.dead_mask().any()


def test_not_collecting_outside_forward():
    """A forward recomputed during backward (activation checkpointing) must not be counted."""
    tracker = SparsityTracker(n_layers=1, d_ffn=2, dead_window_tokens=10)
    tracker(0, torch.ones(3, 2))
    assert tracker.tokens_seen == 0 and tracker.layer_stats()[0].mean_active == 0


def test_reinit_dead_revives_gate_rows_and_clears_moments():
    from sparsify_cli.config.schema import ModelConfig
    from sparsify_cli.model import SparseLlama
    from sparsify_cli.sparsity.dead import reinit_dead_neurons

    model = SparseLlama(ModelConfig(d_model=8, n_layers=1, n_heads=2, d_ffn=4, vocab_size=10))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, 10, (1, 4))).sum().backward()
    opt.step()
    gate = model.blocks[0].ffn.gate.weight
    before = gate.detach().clone()
    tracker = SparsityTracker(1, 4, dead_window_tokens=2)
    tracker.begin_forward(); tracker(0, torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])); tracker.end_forward()
    revived = reinit_dead_neurons(model, tracker, opt, torch.Generator().manual_seed(0))
    assert revived == 3
    assert torch.equal(gate[0], before[0]) and not torch.equal(gate[1:], before[1:])
    assert opt.state[gate]["exp_avg"][1:].abs().sum() == 0 and opt.state[gate]["exp_avg"][0].abs().sum() > 0
    assert not tracker.dead_mask().any()  # the revived get a full window again
