"""CPU tests of the sparse training op's reference (kernels/train_reference.py) against dense torch autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsify_cli.kernels import train_reference as tr
from sparsify_cli.kernels.train_reference import SparseFFNTrainFn, sparse_ffn_train

NAMES = ("x", "gate_w", "up_w", "down_w", "gate_b", "up_b", "down_b")


def make_case(m, d, h, density, dtype=torch.float64, seed=0, bias=True, dense_rows=(), zero_rows=()):
    """Inputs whose gate fires on about `density` of the neurons per token (PERFORMANCE.md's recipe, one rate).

    Feature 0 of x is the constant 1; G's weight on it sets each neuron's threshold. dense_rows: x_0 = -1 flips
    the threshold, so those tokens fire on ~(1 - density) of the neurons (rows above the ELL width).
    zero_rows: x = 0 and (with bias) a negative gate bias: no neuron fires.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=torch.float64)
    x[:, 0] = 1.0
    gate_w = torch.randn(h, d, generator=g, dtype=torch.float64) / d**0.5
    sigma = gate_w[:, 1:].norm(dim=1)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - density, dtype=torch.float64))
    gate_w[:, 0] = -sigma * z
    for r in dense_rows:
        x[r, 0] = -1.0
    up_w = torch.randn(h, d, generator=g, dtype=torch.float64) / d**0.5
    down_w = torch.randn(d, h, generator=g, dtype=torch.float64) / h**0.5
    biases = [None, None, None]
    if bias:
        biases = [-0.01 - 0.01 * torch.rand(h, generator=g, dtype=torch.float64),
                  0.1 * torch.randn(h, generator=g, dtype=torch.float64),
                  0.1 * torch.randn(d, generator=g, dtype=torch.float64)]
    for r in zero_rows:
        x[r] = 0.0
    ws = [x, gate_w, up_w, down_w, *biases]
    return [None if t is None else t.to(dtype) for t in ws]


def dense_ffn(x, gate_w, up_w, down_w, gate_b, up_b, down_b):
    """Dense torch: h = relu(x·Gᵀ + gb) ⊙ (x·Uᵀ + ub) (plain: relu(x·Uᵀ + ub)); l1 = layer_l1's definition."""
    if gate_w is None:
        h = torch.relu(F.linear(x, up_w, up_b))
    else:
        h = torch.relu(F.linear(x, gate_w, gate_b)) * F.linear(x, up_w, up_b)
    return F.linear(h, down_w, down_b), h.abs().sum(-1).mean(), h


def run(fn, inputs, gy, lam):
    """Forward + backward of L = <out, gy> + lam·l1; returns {name: tensor} of out, l1 and every input's grad."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out, l1 = fn(*leaves)[:2]
    ((out * gy).sum() + lam * l1).backward()
    res = {"out": out.detach(), "l1": l1.detach()}
    for name, t in zip(NAMES, leaves):
        if t is not None:
            res["d" + name] = t.grad
    return res


def sparse(width):
    return lambda *a: sparse_ffn_train(*a, width=width)


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def gate_counts(inputs):
    x, gate_w, up_w, _, gate_b, up_b, _ = inputs
    a = F.linear(x, gate_w, gate_b) if gate_w is not None else F.linear(x, up_w, up_b)
    return (a > 0).sum(1)


def compare(inputs, width, tol, seed=1, lam=0.37):
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64).to(inputs[0].dtype)
    want = run(dense_ffn, inputs, gy, lam)
    got = run(sparse(width), inputs, gy, lam)
    assert want.keys() == got.keys()
    errs = {k: rel(got[k], want[k]) for k in want}
    bad = {k: e for k, e in errs.items() if e > tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errs


# density, width: about half of the random rows exceed the width (the dense tail), plus forced dense rows
# (~(1 - density)·H active) and an all-zero row, so every case has ELL rows, tail rows and an empty row.
CASES = [(0.5, 500), (0.1, 100), (0.01, 10), (0.001, 1)]


@pytest.mark.parametrize("density,width", CASES)
@pytest.mark.parametrize("gated", [True, False])
def test_float64_matches_dense_autograd(density, width, gated):
    m, d, h = 48, 24, 997  # ragged H (prime)
    inputs = make_case(m, d, h, density, dense_rows=(0, 7), zero_rows=(3,), seed=int(density * 1000) + gated)
    if not gated:  # the thresholded weight and bias become the up projection's
        inputs[2], inputs[5] = inputs[1], inputs[4]
        inputs[1] = inputs[4] = None
    counts = gate_counts(inputs)
    assert (counts > width).sum() >= 2 and ((counts <= width) & (counts > 0)).any() and counts[3] == 0
    compare(inputs, width, tol=1e-10)


def test_default_width_with_tail_rows():
    inputs = make_case(40, 16, 1000, 0.01, dense_rows=(5, 6, 39), zero_rows=(0,))
    counts = gate_counts(inputs)
    assert (counts > tr.DEFAULT_WIDTH).sum() == 3 and counts.max() > 900
    compare(inputs, tr.DEFAULT_WIDTH, tol=1e-10)


@pytest.mark.parametrize("density,width", CASES)
def test_float32_error_within_twice_dense_float32(density, width):
    """fp32: error vs the fp64 dense reference within 2x of dense torch autograd's in fp32, plus a 1e-6 floor.

    The floor is for 50% density, where a row sums ~500 gathered rows one after another (BLAS sums in blocks):
    dx reaches ~4x dense's error there (8e-7 vs 2e-7). A real defect (a lost row, a wrong term) is >= 1e-3.
    """
    m, d, h = 48, 24, 997
    inputs64 = make_case(m, d, h, density, dense_rows=(0, 7), zero_rows=(3,), seed=7)
    inputs32 = [t.float() for t in inputs64]
    gy = torch.randn(m, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = run(dense_ffn, [t.double() for t in inputs32], gy, 0.37)  # exact reference of the fp32 inputs
    dense32 = run(dense_ffn, inputs32, gy.float(), 0.37)
    sparse32 = run(sparse(width), inputs32, gy.float(), 0.37)
    for k in ref:
        e_sparse, e_dense = rel(sparse32[k], ref[k]), rel(dense32[k], ref[k])
        assert sparse32[k].dtype == dense32[k].dtype
        assert e_sparse <= 2 * e_dense + 1e-6, (k, e_sparse, e_dense)


def test_all_dense_every_neuron_active():
    """ReLU of positive inputs: every neuron fires on every token, every row is in the tail (also at W = 128)."""
    g = torch.Generator().manual_seed(4)
    m, d, h = 9, 8, 200
    x = torch.rand(m, d, generator=g, dtype=torch.float64) + 0.1
    inputs = [x, torch.rand(h, d, generator=g, dtype=torch.float64), torch.randn(h, d, generator=g, dtype=torch.float64),
              torch.randn(d, h, generator=g, dtype=torch.float64), None, None, None]
    assert bool((gate_counts(inputs) == h).all())
    compare(inputs, tr.DEFAULT_WIDTH, tol=1e-10)
    res = sparse_ffn_train(*inputs)
    assert torch.equal(res.token_counts, torch.full((m,), h)) and torch.equal(res.neuron_counts, torch.full((h,), m))


@pytest.mark.parametrize("dense_row", [False, True])
def test_single_token(dense_row):
    inputs = make_case(1, 16, 301, 0.05, dense_rows=(0,) if dense_row else (), seed=11)
    counts = gate_counts(inputs)
    assert (counts > 32).item() == dense_row and counts.item() > 0
    compare(inputs, 32, tol=1e-10)


def test_all_zero_rows_give_bias_only_and_no_gradient_through_the_ffn():
    inputs = make_case(6, 8, 50, 0.1, zero_rows=range(6))
    assert int(gate_counts(inputs).sum()) == 0
    res = sparse_ffn_train(*inputs)
    assert torch.equal(res.out, inputs[6].expand(6, -1)) and res.l1.item() == 0.0
    assert int(res.token_counts.sum()) == 0 and int(res.neuron_counts.sum()) == 0
    compare(inputs, 4, tol=1e-10)


def test_counts_match_dense_activation_statistics():
    inputs = make_case(48, 24, 997, 0.01, dense_rows=(1,), zero_rows=(2,), seed=5)
    res = sparse_ffn_train(*inputs, width=10)
    h = dense_ffn(*inputs)[2]
    assert res.token_counts.dtype == torch.int64 and res.neuron_counts.shape == (997,)
    assert torch.equal(res.token_counts, (h != 0).sum(1)) and torch.equal(res.neuron_counts, (h != 0).sum(0))
    assert not res.token_counts.requires_grad


@pytest.mark.parametrize("gated", [True, False])
def test_gradcheck_tiny(gated):
    g = torch.Generator().manual_seed(2)
    m, d, h = 4, 3, 7
    inputs = [torch.randn(s, generator=g, dtype=torch.float64) for s in ((m, d), (h, d), (h, d), (d, h), (h,), (h,), (d,))]
    if not gated:
        inputs[1] = inputs[4] = None
    a = F.linear(inputs[0], inputs[1] if gated else inputs[2], inputs[4] if gated else inputs[5])
    assert a.abs().min() > 1e-3  # finite differences must not flip the pattern
    counts = (a > 0).sum(1)
    assert (counts > 2).any() and ((counts <= 2) & (counts > 0)).any()  # width 2: ELL rows and tail rows
    leaves = [None if t is None else t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: sparse_ffn_train(*a, width=2)[:2], leaves)


def _saved_shapes(fn, inputs):
    """Shapes of every tensor autograd saves for backward while fn runs (and of tensors stashed on the ctx)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*leaves)[0]
    return shapes, out.grad_fn


def test_saved_for_backward_has_no_dense_activation():
    m, d, h, w = 64, 16, 1000, 32
    inputs = make_case(m, d, h, 0.01, dense_rows=(9,), zero_rows=(1,))
    n_tail = int((gate_counts(inputs) > w).sum())
    assert 1 <= n_tail <= 8
    dense_shapes, _ = _saved_shapes(dense_ffn, inputs)
    assert (m, h) in dense_shapes  # the hook sees what dense autograd keeps: the check below can fail
    shapes, grad_fn = _saved_shapes(lambda *a: sparse_ffn_train(*a, width=w), inputs)
    assert (m, h) not in shapes
    params = {(h, d), (d, h)}  # the weights: references to the parameters, not new memory
    allowed = {(m, d), (m, w), (m,), (n_tail,), (n_tail, h)}
    assert set(shapes) <= params | allowed, shapes
    saved = sum(torch.Size(s).numel() for s in shapes if s not in params)
    assert saved == m * d + 3 * m * w + m + n_tail + 2 * n_tail * h
    assert saved < m * h / 3 and sum(torch.Size(s).numel() for s in dense_shapes) > 3 * m * h
    assert isinstance(grad_fn, SparseFFNTrainFn._backward_cls)
    stashed = [k for k, v in vars(grad_fn).items() if isinstance(v, torch.Tensor)]
    assert not stashed, stashed


def test_sign_of_l1_gradient_and_zero_l1_weight():
    """gl1 reaches dh only through sign(h): with gy = 0 the grads are the L1 term's alone and vanish with lam."""
    inputs = make_case(16, 8, 120, 0.1, seed=9)
    zero = torch.zeros(16, 8, dtype=torch.float64)
    only_l1 = run(sparse(16), inputs, zero, 1.0)
    want = run(dense_ffn, inputs, zero, 1.0)
    assert float(only_l1["dup_w"].abs().max()) > 0
    for k in ("dx", "dgate_w", "dup_w", "dgate_b", "dup_b"):
        assert rel(only_l1[k], want[k]) < 1e-10
    assert float(run(sparse(16), inputs, zero, 0.0)["dup_w"].abs().max()) == 0.0


def test_refuses_bad_inputs_and_unknown_backend():
    inputs = make_case(4, 8, 20, 0.2)
    x, gw, uw, dw, gb, ub, db = inputs
    with pytest.raises(ValueError, match="down_w must be"):
        sparse_ffn_train(x, gw, uw, dw.t())
    with pytest.raises(ValueError, match="cast them first"):
        sparse_ffn_train(x, gw.float(), uw, dw)
    with pytest.raises(ValueError, match="gate_b given without gate_w"):
        sparse_ffn_train(x, None, uw, dw, gb)
    with pytest.raises(ValueError, match="M >= 1"):
        sparse_ffn_train(x[:0], gw, uw, dw)
    with pytest.raises(ValueError, match="backend 'nope' is not available"):
        sparse_ffn_train(x, gw, uw, dw, backend="nope")
    with pytest.raises(ValueError, match="must be a CUDA tensor"):  # the CUDA op refuses CPU tensors, by name
        sparse_ffn_train(x, gw, uw, dw, backend="cuda")


def test_pairs_are_chunked(monkeypatch):
    """The gather/scatter loops over chunks of pairs give the same result as one chunk."""
    inputs = make_case(32, 8, 300, 0.1, dense_rows=(0,), seed=3)
    whole = run(sparse(64), inputs, torch.ones(32, 8, dtype=torch.float64), 0.5)
    monkeypatch.setattr(tr, "_CHUNK", 7)
    chunked = run(sparse(64), inputs, torch.ones(32, 8, dtype=torch.float64), 0.5)
    for k in whole:
        assert rel(chunked[k], whole[k]) < 1e-12, k
