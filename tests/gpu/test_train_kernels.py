"""The CUDA training op (kernels/train_cuda.py) against the fp32 math, on fresh random inputs.

Judge (issue 6, PERFORMANCE.md's rule): for the output, the L1 term and every gradient, the relative error
max|op − fp32| / max|fp32| must be within 2× (plus 1e-4) of what plain torch bf16 autograd of the same FFN gets
against the same fp32 reference. Both bf16 paths share the gate GEMM (cuBLAS bf16), so they see the same pattern.
Densities 50%…99.9%, rows above the ELL width (the dense tail), all-dense and all-zero rows, ragged M and H,
D above one register chunk, biases on/off, gated and plain; buffers the op allocates are poisoned (NaN) first.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sparsify_cli.kernels.train_reference import sparse_ffn_train, sparse_ffn_train_reference

DEV = "cuda"


def _poison_allocator() -> None:
    """Fill the caching allocator's free blocks with NaN bytes, so an output slot the op forgets to write shows."""
    blocks = [torch.empty(64 << 20, dtype=torch.uint8, device=DEV).fill_(0xFF) for _ in range(4)]
    del blocks


def _inputs(m, d, h, density, gated=True, bias=False, dense_rows=(), zero_rows=(), seed=0):
    """bf16 inputs whose gate fires with about `density` per (token, neuron): feature 0 is a constant 1 and the
    gate's weight on it sets each neuron's threshold (spread so neurons differ, as in trained models)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(m, d, generator=gen)
    x[:, 0] = 1.0
    for r in dense_rows:
        x[r, 0] = 40.0  # every gate fires: the row exceeds any ELL width
    for r in zero_rows:
        x[r, 0] = -40.0  # no gate fires
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(density).clamp(1e-6, 1 - 1e-6))
    first = torch.randn(h, d, generator=gen) / math.sqrt(d - 1)
    first[:, 0] = z + 0.3 * torch.randn(h, generator=gen)
    other = torch.randn(h, d, generator=gen) / math.sqrt(d)
    down = torch.randn(d, h, generator=gen) / math.sqrt(h * max(density, 1e-3))
    gate_w, up_w = (first, other) if gated else (None, first)
    biases = [None, None, None]
    if bias:
        biases = [0.1 * torch.randn(h, generator=gen) if gated else None, 0.1 * torch.randn(h, generator=gen),
                  0.1 * torch.randn(d, generator=gen)]
    gy = torch.randn(m, d, generator=gen)
    ts = [x, gate_w, up_w, down, *biases]
    return [None if t is None else t.to(DEV, torch.bfloat16) for t in ts], gy.to(DEV, torch.bfloat16)


def _dense(x, gate_w, up_w, down_w, gate_b, up_b, down_b):
    """Plain torch autograd of the same FFN + L1 term, in the inputs' dtype (out, l1, h)."""
    if gate_w is not None:
        h = F.relu(F.linear(x, gate_w, gate_b)) * F.linear(x, up_w, up_b)
    else:
        h = F.relu(F.linear(x, up_w, up_b))
    out = F.linear(h, down_w, down_b)
    l1 = h.float().abs().sum() / x.shape[0]
    return out, l1, h


def _run(fn, ts, gy, lam):
    """Forward + backward of ⟨out, gy⟩ + lam·l1 with fresh leaves; returns (out, l1, grads, extras)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]
    res = fn(*leaves)
    out, l1 = res[0], res[1]
    loss = (out.float() * gy.float()).sum() + lam * l1
    loss.backward()
    return out.detach(), l1.detach(), [None if t is None else t.grad for t in leaves], res


def _rel(a, ref):
    a, ref = a.float(), ref.float()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _check_against_fp32(ts, gy, width, lam_scale=0.1, hot=None):
    m = ts[0].shape[0]
    lam = lam_scale * m  # the L1 term's gradient per |h| is lam / M = lam_scale: comparable to gy·Down
    f32 = [None if t is None else t.float() for t in ts]
    ref = _run(lambda *a: _dense(*a), f32, gy.float(), lam)
    bf = _run(lambda *a: _dense(*a), ts, gy, lam)
    _poison_allocator()
    sp = _run(lambda *a: sparse_ffn_train(*a, width=width, backend="cuda", hot=hot), ts, gy, lam)
    names = ["x", "gate_w", "up_w", "down_w", "gate_b", "up_b", "down_b"]
    report = {}
    for name, a, b, r in [("out", sp[0], bf[0], ref[0]), ("l1", sp[1], bf[1], ref[1])] + [
            (f"d{n}", sp[2][i], bf[2][i], ref[2][i]) for i, n in enumerate(names) if ref[2][i] is not None]:
        assert a is not None, f"{name}: no gradient"
        assert torch.isfinite(a.float()).all(), f"{name}: non-finite values (an unwritten slot?)"
        e_sp, e_bf = _rel(a, r), _rel(b, r)
        report[name] = (e_sp, e_bf)
        assert e_sp <= 2 * e_bf + 1e-4, f"{name}: sparse {e_sp:.2e} vs torch bf16 {e_bf:.2e} ({report})"
    # statistics: the op counts h != 0 exactly as the dense path's h would
    h_bf = bf[3][2]
    tok, neu = sp[3].token_counts, sp[3].neuron_counts
    assert tok.dtype == torch.int64 and neu.dtype == torch.int64
    want_tok, want_neu = (h_bf != 0).sum(1), (h_bf != 0).sum(0)
    assert (tok - want_tok).abs().sum().item() <= max(2, 1e-4 * want_tok.sum().item())
    assert (neu - want_neu).abs().sum().item() <= max(2, 1e-4 * want_neu.sum().item())
    return report


CASES = [  # (M, D, H, density, width, gated, bias)
    (512, 256, 1024, 0.01, 64, True, False),
    (512, 256, 1024, 0.005, 32, True, True),
    (1000, 512, 1000, 0.02, 64, False, False),  # ragged H (not a multiple of 8: scalar loads), plain FFN
    (777, 128, 2048, 0.001, 16, True, False),
    (300, 2560, 1536, 0.02, 64, True, False),  # D above one register chunk (2048)
    (256, 64, 512, 0.10, 64, True, True),
    (256, 128, 512, 0.50, 128, True, False),  # most rows go to the dense tail
    (1, 256, 1024, 0.02, 64, True, False),  # M = 1
    (37, 192, 704, 0.03, 32, False, True),
]


@pytest.mark.parametrize("hot_share", [0.0, 0.2])
@pytest.mark.parametrize("m,d,h,density,width,gated,bias", CASES)
def test_matches_fp32_within_bf16_band(m, d, h, density, width, gated, bias, hot_share):
    """hot_share > 0: that share of the neurons (random, so hot and cold mix in every row) takes the dense path."""
    ts, gy = _inputs(m, d, h, density, gated, bias, dense_rows=(0,) if m > 2 else (), zero_rows=(m - 1,) if m > 2 else (),
                     seed=m + d + h)
    hot = None
    if hot_share:
        hot = torch.rand(h, generator=torch.Generator().manual_seed(h)) < hot_share
        hot = hot.to(DEV)
    _check_against_fp32(ts, gy, width, hot=hot)


def test_hot_mask_from_counts_and_all_hot():
    from sparsify_cli.kernels.train_cuda import hot_mask

    ts, gy = _inputs(1024, 256, 1024, 0.03, seed=11, dense_rows=(3,))
    first = sparse_ffn_train(*ts, width=64, backend="cuda")
    hot = hot_mask(first.neuron_counts, 1024)
    assert 0 < int(hot.sum()) < 1024
    _check_against_fp32(ts, gy, 64, hot=hot)
    _check_against_fp32(ts, gy, 64, hot=torch.ones(1024, dtype=torch.bool, device=DEV))  # nothing per pair


def test_all_rows_dense_and_all_rows_empty():
    ts, gy = _inputs(64, 128, 512, 1.0, seed=1)  # every neuron active: R = M
    _check_against_fp32(ts, gy, 32)
    ts, gy = _inputs(64, 128, 512, 0.0, seed=2)  # nothing active: out = db, zero gradients but db
    sp = _run(lambda *a: sparse_ffn_train(*a, width=32, backend="cuda"), ts, gy, 1.0)
    assert sp[0].abs().max().item() == 0 and sp[1].item() == 0
    for gr in sp[2][:4]:
        assert gr.abs().max().item() == 0


@pytest.mark.parametrize("nnz", [110, 200, 300])
def test_no_crash_and_exact_at_high_active_counts(nnz):
    """The paper's kernel crashed at ~110 active neurons per token; here rows above W go to the dense tail."""
    h = 5632
    ts, gy = _inputs(2048, 512, h, nnz / h, seed=nnz)
    rep = _check_against_fp32(ts, gy, 128)
    assert rep


def test_matches_the_reference_op_bit_for_bit_in_pattern_and_counts():
    """Same pattern and statistics as the pure-torch op run in bf16 (same gate GEMM)."""
    ts, gy = _inputs(700, 256, 1024, 0.02, seed=5)
    a = sparse_ffn_train(*ts, width=64, backend="cuda")
    b = sparse_ffn_train_reference(*ts, width=64)
    assert torch.equal(a.token_counts, b.token_counts)
    assert torch.equal(a.neuron_counts, b.neuron_counts)
    assert _rel(a.out, b.out) < 2e-2


def test_backward_is_deterministic():
    ts, gy = _inputs(2048, 256, 1024, 0.05, seed=7)  # hot neurons: segments split into chunks (reduce kernel)
    r1 = _run(lambda *a: sparse_ffn_train(*a, width=128, backend="cuda"), ts, gy, 3.0)
    r2 = _run(lambda *a: sparse_ffn_train(*a, width=128, backend="cuda"), ts, gy, 3.0)
    for g1, g2 in zip(r1[2], r2[2]):
        if g1 is not None:
            assert torch.equal(g1, g2)


def test_saves_no_dense_activation():
    m, d, h = 1024, 128, 2048
    ts, gy = _inputs(m, d, h, 0.01, seed=3)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in ts]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = sparse_ffn_train(*leaves, width=64, backend="cuda")
    assert (m, h) not in saved and (h, m) not in saved, saved
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _dense(*leaves)
    assert (m, h) in saved  # the hook does see dense autograd's activations (the check can fail)
    (res.out.float() * gy.float()).sum().backward()


def test_refuses_what_the_kernels_cannot_do():
    ts, _ = _inputs(16, 64, 256, 0.05)
    with pytest.raises(ValueError, match="bf16"):
        sparse_ffn_train(*[None if t is None else t.float() for t in ts], backend="cuda")
    with pytest.raises(ValueError, match="width"):
        sparse_ffn_train(*ts, width=4096, backend="cuda")


@pytest.mark.parametrize("rows,cols", [(2048, 5632), (37, 1000), (1, 64)])
def test_transpose_kernel(rows, cols):
    from sparsify_cli.kernels.train_cuda import transpose

    t = torch.randn(rows, cols, device=DEV).to(torch.bfloat16)
    assert torch.equal(transpose(t), t.t().contiguous())


@pytest.mark.parametrize("ckpt", [False, True])
def test_model_trains_on_the_cuda_op_with_a_changing_hot_set(ckpt):
    """A SparseLlama whose FFNs run the CUDA op under bf16 autocast, several micro-batches (the hot set changes
    between them): with activation checkpointing the recomputed forward must use the same hot set as the original
    one (same saved shapes); loss and gradients match the dense path's within the bf16 band."""
    import torch.nn.functional as F

    from sparsify_cli.config.schema import ModelConfig
    from sparsify_cli.model import SparseLlama
    from sparsify_cli.sparsity import SparsityTracker

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=256, n_layers=2, n_heads=4, d_ffn=1024, vocab_size=512, max_seq_len=128,
                      mlp_bias=True)
    model = SparseLlama(cfg).to(DEV)
    with torch.no_grad():  # negative gate biases: neurons fire on ~0.01%…10% of the tokens, ~1% on average
        for ffn in model.ffns:
            scale = ffn.gate.weight.norm(dim=1)
            ffn.gate.bias.copy_(-(2.3 + 0.6 * torch.randn_like(scale)) * scale)
    tokens = torch.randint(0, cfg.vocab_size, (4, 129), device=DEV)

    def run(sparse: bool, steps: int = 3):
        for ffn in model.ffns:
            ffn.sparse_train, ffn.sparse_backend, ffn.sparse_width = sparse, "cuda", 256
            ffn.sparse_hot = ffn._hot_next = None
        model.activation_checkpointing = ckpt
        tracker = SparsityTracker(cfg.n_layers, cfg.d_ffn, dead_window_tokens=1 << 20, device=torch.device(DEV))
        model.set_observer(tracker)
        out = None
        for i in range(steps):
            model.zero_grad()
            tracker.begin_forward(want_l1=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(tokens[:, :-1])
            l1 = tracker.end_forward()
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()) + 0.1 * l1
            loss.backward()
            out = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return out

    loss_d, grads_d = run(False)
    loss_s, grads_s = run(True)
    assert any(ffn.sparse_hot is not None and ffn.sparse_hot.n > 0 for ffn in model.ffns), "no hot set used"
    assert abs(loss_s.item() - loss_d.item()) <= 2e-2 * abs(loss_d.item())
    num = sum(float((grads_s[n] - grads_d[n]).double().pow(2).sum()) for n in grads_d)
    den = sum(float(grads_d[n].double().pow(2).sum()) for n in grads_d)
    assert (num / den) ** 0.5 < 3e-2


@pytest.mark.parametrize("gated", [True, False])
def test_hot_set_known_on_host_equals_device_mask(gated):
    """A HotSet (indices known on the host: the hot GEMMs are queued before the op's host wait) gives the same bits
    as the same hot set passed as a device mask, for the outputs, the counts and every gradient."""
    from sparsify_cli.kernels.train_cuda import HotSet, PendingHot, hot_mask

    ts, gy = _inputs(777, 256, 1000, 0.03, gated, True, dense_rows=(5,), seed=21)
    first = sparse_ffn_train(*ts, width=64, backend="cuda")
    mask = hot_mask(first.neuron_counts, 777)
    assert 0 < int(mask.sum()) < 1000
    pending = PendingHot(first.neuron_counts, 777).resolve()  # as a layer does it: through pinned memory
    assert pending.n == int(mask.sum()) and torch.equal(pending.mask, mask)
    lam = 0.1 * 777
    a = _run(lambda *t: sparse_ffn_train(*t, width=64, backend="cuda", hot=mask), ts, gy, lam)
    b = _run(lambda *t: sparse_ffn_train(*t, width=64, backend="cuda", hot=pending), ts, gy, lam)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[3].token_counts, b[3].token_counts) and torch.equal(a[3].neuron_counts, b[3].neuron_counts)
    for ga, gb in zip(a[2], b[2]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            assert torch.equal(ga, gb)
    with pytest.raises(ValueError, match="HotSet is for"):
        sparse_ffn_train(*ts[:4], width=64, backend="cuda", hot=HotSet.from_mask_host(torch.zeros(999, dtype=torch.bool), DEV))
