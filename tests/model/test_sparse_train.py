"""The FFN's sparse training switch (FeedForward.sparse_train): same loss, gradients and statistics as dense."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.kernels import train_reference
from sparsify_cli.model import SparseLlama
from sparsify_cli.model.ffn import FeedForward
from sparsify_cli.sparsity import SparsityTracker


def make(**kw) -> SparseLlama:
    base = dict(d_model=32, n_layers=2, n_heads=4, d_ffn=64, vocab_size=50, max_seq_len=16)
    torch.manual_seed(0)
    return SparseLlama(ModelConfig(**{**base, **kw}))


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the sparse op (through the backend table the model dispatches on)."""
    n = [0]
    ref = train_reference.TRAIN_BACKENDS["torch"]

    def spy(*a, **k):
        n[0] += 1
        return ref(*a, **k)

    monkeypatch.setitem(train_reference.TRAIN_BACKENDS, "torch", spy)
    return n


def step(model, tokens, sparse, ckpt=False, lam=0.5):
    """One training forward/backward with the tracker as observer; returns loss, grads, tracker."""
    for ffn in model.ffns:
        ffn.sparse_train = sparse
        ffn.sparse_width = 8  # d_ffn = 64: some tokens exceed it (dense tail), most do not
    model.activation_checkpointing = ckpt
    model.zero_grad()
    tracker = SparsityTracker(model.cfg.n_layers, model.cfg.d_ffn, dead_window_tokens=4)
    model.set_observer(tracker)
    tracker.begin_forward()
    logits = model(tokens[:, :-1])
    l1 = tracker.end_forward()
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) + lam * l1
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), l1.detach(), grads, tracker


@pytest.mark.parametrize("lam,tol", [(0.0, 1e-10), (0.5, 1e-6)])
@pytest.mark.parametrize("kw", [dict(mlp_bias=True), dict(ffn="plain"), dict(ckpt=True)])
def test_sparse_switch_matches_dense_in_float64(kw, lam, tol, calls):
    """Same loss, gradients and statistics; tol: layer_l1 sums in fp32 (h.float()), so with the L1 term the
    dense side carries fp32 rounding (1e-8 relative), which the op (fp64 here) does not."""
    ckpt = kw.pop("ckpt", False)
    model = make(**kw).double()
    with torch.no_grad():  # biases shift the pattern: give them values
        for ffn in model.ffns:
            if ffn.up.bias is not None:
                ffn.up.bias.normal_(0, 0.1)
                ffn.down.bias.normal_(0, 0.1)
    tokens = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    # The dense reference runs without checkpointing: with it, the tracker's L1 term (computed in the original
    # forward only) changes the number of saved tensors and torch's checkpoint refuses (a known issue of the
    # dense path); the sparse op computes L1 inside the op, so its recomputation saves the same tensors.
    loss_d, l1_d, grads_d, tr_d = step(model, tokens, sparse=False, lam=lam)
    assert calls[0] == 0
    loss_s, l1_s, grads_s, tr_s = step(model, tokens, sparse=True, ckpt=ckpt, lam=lam)
    assert calls[0] == (2 if not ckpt else 4)  # one per layer (+ the recomputation under checkpointing)
    assert abs(float(loss_s - loss_d)) < 1e-6 * float(loss_d) and abs(float(l1_s - l1_d)) < 1e-6 * float(l1_d)
    assert grads_s.keys() == grads_d.keys()
    for name, g in grads_d.items():
        err = float((grads_s[name] - g).abs().max() / g.abs().max().clamp_min(1e-300))
        assert err < tol, (name, err)
    stats_d, stats_s = tr_d.layer_stats(), tr_s.layer_stats()
    assert stats_s == stats_d and stats_d[0].max_active > 8  # some tokens went to the dense tail
    assert torch.equal(tr_s.last_fired, tr_d.last_fired) and tr_s.tokens_seen == tr_d.tokens_seen == 33


def test_off_by_default_and_observer_needing_h_gets_the_dense_path(calls):
    model = make()
    assert FeedForward.sparse_train is False and not any(f.sparse_train for f in model.ffns)
    tokens = torch.randint(0, 50, (2, 6))
    model(tokens)
    assert calls[0] == 0
    seen = []
    model.set_observer(lambda layer, h: seen.append(h.shape))
    for ffn in model.ffns:
        ffn.sparse_train = True
    model(tokens)
    assert calls[0] == 0 and seen == [(2, 6, 64)] * 2  # a plain function observer needs h: dense path
    model.set_observer(None)
    model(tokens)
    assert calls[0] == 2


def test_sparse_train_refuses_silu():
    model = make(activation="silu")
    model.ffns[0].sparse_train = True
    with pytest.raises(ValueError, match="needs activation='relu'"):
        model(torch.randint(0, 50, (1, 4)))


def test_autocast_bf16_computes_in_bf16_like_nn_linear(calls):
    ffn = make(mlp_bias=True).ffns[0]
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = ffn(x)
        ffn.sparse_train = True
        sparse = ffn(x)
    assert calls[0] == 1 and sparse.dtype == dense.dtype == torch.bfloat16 and sparse.shape == (2, 5, 32)
    assert float((sparse.float() - dense.float()).detach().abs().max()) <= 0.02 * float(dense.detach().float().abs().max())
