"""Sparse FFN forwards against the dense FFN (CPU references of the kernels)."""

import pytest
import torch

from sparsify_cli.bench.synthetic import make_ffn_inputs as _make_inputs
from sparsify_cli.formats.sparse_ffn import (
    dense_ffn_forward,
    dense_plain_ffn_forward,
    down_rows,
    sparse_ffn_forward,
    sparse_plain_ffn_forward,
    twell_ffn_forward,
    twell_plain_ffn_forward,
)
from sparsify_cli.formats.twell import pack_twell


def make_ffn_inputs(m, d, h, nnz, seed=0):
    """PERFORMANCE.md's inputs (bench/synthetic.py) in fp32 on the CPU; the weights under their formats/ names."""
    inp = _make_inputs(m, d, h, nnz, seed=seed, dtype=torch.float32)
    inp.gate_w, inp.up_w, inp.down_w = inp.gate, inp.up, inp.down
    return inp


def close(y, ref):
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-6 * float(ref.abs().max()))


def biases(h, d, seed):
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(h, generator=g), 0.1 * torch.randn(h, generator=g), 0.1 * torch.randn(d, generator=g)


@pytest.mark.parametrize("m,d,h,nnz", [(1, 256, 700, 7), (1, 128, 301, 30), (16, 256, 700, 7), (40, 64, 999, 50),
                                       (64, 128, 1000, 100), (3, 64, 100, 30)])
@pytest.mark.parametrize("method", ["auto", "pairs", "union"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sparse_gated_equals_dense(m, d, h, nnz, method, with_bias):
    inp = make_ffn_inputs(m, d, h, nnz, seed=m + h)
    gb, ub, db = biases(h, d, seed=h) if with_bias else (None, None, None)
    ref = dense_ffn_forward(inp.x, inp.gate_w, inp.up_w, inp.down_w, gb, ub, db)
    y = sparse_ffn_forward(inp.x, inp.gate_w, inp.up_w, down_rows(inp.down_w), gb, ub, db, method=method)
    active = (torch.relu(inp.x @ inp.gate_w.T + (0 if gb is None else gb)) != 0).float().mean()
    assert 0 < active < 0.5  # a sparse pattern, not all-off or all-on
    close(y, ref)


@pytest.mark.parametrize("m,h,nnz", [(1, 700, 7), (20, 333, 30)])
@pytest.mark.parametrize("method", ["pairs", "union"])
def test_sparse_plain_equals_dense(m, h, nnz, method):
    inp = make_ffn_inputs(m, 96, h, nnz, seed=h)  # the gate weights serve as the plain FFN's up weights
    ub, _, db = biases(h, 96, seed=1)
    ref = dense_plain_ffn_forward(inp.x, inp.gate_w, inp.down_w, ub, db)
    close(sparse_plain_ffn_forward(inp.x, inp.gate_w, down_rows(inp.down_w), ub, db, method=method), ref)


def test_inactive_neurons_are_never_read():
    inp = make_ffn_inputs(8, 64, 500, 10, seed=3)
    ref = dense_ffn_forward(inp.x, inp.gate_w, inp.up_w, inp.down_w)
    idle = (torch.relu(inp.x @ inp.gate_w.T) == 0).all(dim=0)  # (H,) off for every token
    assert idle.sum() > 100
    up, down_t = inp.up_w.clone(), down_rows(inp.down_w)
    up[idle] = float("nan")
    down_t[idle] = float("nan")
    for method in ("pairs", "union"):
        close(sparse_ffn_forward(inp.x, inp.gate_w, up, down_t, method=method), ref)


def test_all_off_rows_give_the_bias_and_zero_tokens_work():
    inp = make_ffn_inputs(4, 64, 200, 5, seed=4)
    gate_w = inp.gate_w.clone()
    gate_w[:, 0] = -100.0  # nothing fires
    db = torch.randn(64)
    y = sparse_ffn_forward(inp.x, gate_w, inp.up_w, down_rows(inp.down_w), down_b=db)
    assert torch.equal(y, db.expand(4, 64))
    assert sparse_ffn_forward(inp.x[:0], inp.gate_w, inp.up_w, down_rows(inp.down_w)).shape == (0, 64)


def test_shape_errors():
    inp = make_ffn_inputs(2, 32, 100, 5)
    with pytest.raises(ValueError, match="down_t"):
        sparse_ffn_forward(inp.x, inp.gate_w, inp.up_w, inp.down_w)  # (D, H) given instead of (H, D)
    with pytest.raises(ValueError, match="up_w"):
        sparse_ffn_forward(inp.x, inp.gate_w, inp.up_w[:, :16], down_rows(inp.down_w))
    with pytest.raises(ValueError, match="2-D"):
        sparse_ffn_forward(inp.x[0], inp.gate_w, inp.up_w, down_rows(inp.down_w))
    with pytest.raises(ValueError, match="method"):
        sparse_ffn_forward(inp.x, inp.gate_w, inp.up_w, down_rows(inp.down_w), method="fast")


def _gated_with_bf16_gate(x, gate_w, up_w, down_w, gb, ub, db):
    """What the kernel computes for rows without overflow: the gate as stored in TwELL (bf16)."""
    a = torch.relu(x @ gate_w.T + gb).to(torch.bfloat16).float()
    return (a * (x @ up_w.T + ub)) @ down_w.T + db


@pytest.mark.parametrize("method", ["pairs", "union"])
def test_twell_forward_with_overflow_rows(method):
    inp = make_ffn_inputs(48, 128, 300, 12, seed=11)
    gb, ub, db = biases(300, 128, seed=2)
    gate = torch.relu(inp.x @ inp.gate_w.T + gb)  # (M, H)
    tw = pack_twell(gate, tile=64, compression=16)  # capacity 3 per tile of 64: some rows overflow
    over = tw.row_overflow
    assert 0 < int(over.sum()) < 48
    y = twell_ffn_forward(inp.x, tw, inp.up_w, down_rows(inp.down_w), gate_w=inp.gate_w, gate_b=gb, up_b=ub,
                          down_b=db, method=method)
    dense = dense_ffn_forward(inp.x, inp.gate_w, inp.up_w, inp.down_w, gb, ub, db)
    close(y[over], dense[over])  # overflow rows: exact (dense path, full precision gate)
    close(y[~over], _gated_with_bf16_gate(inp.x, inp.gate_w, inp.up_w, inp.down_w, gb, ub, db)[~over])
    # the stored entries of overflow rows alone would be wrong: make sure the test can see that
    assert not torch.allclose(y[over], _truncated(inp, tw, gb, ub, db)[over], rtol=1e-3)
    with pytest.raises(ValueError, match="gate_w"):
        twell_ffn_forward(inp.x, tw, inp.up_w, down_rows(inp.down_w), up_b=ub, down_b=db)


def _truncated(inp, tw, gb, ub, db):
    from sparsify_cli.formats.twell import unpack_twell

    a = unpack_twell(tw, allow_overflow=True).float()
    return (a * (inp.x @ inp.up_w.T + ub)) @ inp.down_w.T + db


def test_twell_forward_without_overflow_needs_no_gate_and_m1():
    inp = make_ffn_inputs(1, 256, 5632 // 8, 8, seed=5)
    gate = torch.relu(inp.x @ inp.gate_w.T)
    tw = pack_twell(gate)
    assert tw.n_overflow_tiles == 0 and tw.nnz > 0
    y = twell_ffn_forward(inp.x, tw, inp.up_w, down_rows(inp.down_w))
    close(y, _gated_with_bf16_gate(inp.x, inp.gate_w, inp.up_w, inp.down_w, 0.0, 0.0, 0.0))


def test_twell_plain_forward_with_overflow_rows():
    inp = make_ffn_inputs(30, 64, 260, 10, seed=6)
    ub, _, db = biases(260, 64, seed=3)
    ub = ub * 0.1  # small enough to keep the pattern sparse
    h = torch.relu(inp.x @ inp.gate_w.T + ub)  # plain FFN: gate_w plays U
    tw = pack_twell(h, tile=32, compression=16)
    over = tw.row_overflow
    assert 0 < int(over.sum()) < 30
    y = twell_plain_ffn_forward(inp.x, tw, down_rows(inp.down_w), up_w=inp.gate_w, up_b=ub, down_b=db)
    dense = dense_plain_ffn_forward(inp.x, inp.gate_w, inp.down_w, ub, db)
    close(y[over], dense[over])
    close(y[~over], (h.to(torch.bfloat16).float() @ inp.down_w.T + db)[~over])
    with pytest.raises(ValueError, match="up_w"):
        twell_plain_ffn_forward(inp.x, tw, down_rows(inp.down_w))


@pytest.mark.parametrize("n", [1, 3, 30, 300])
def test_gather_rows_in_pieces_equals_index_select(monkeypatch, n):
    from sparsify_cli.formats.sparse_ffn import add_rows, gather_rows

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the piecewise path only runs with > 1 thread
    w = torch.randn(100, 8192)  # 4 rows per serial piece
    idx = torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(n))
    assert torch.equal(gather_rows(w, idx), w[idx])
    src = torch.randn(n, 8192)
    assert torch.equal(add_rows(torch.zeros(5, 8192), idx % 5, src), torch.zeros(5, 8192).index_add_(0, idx % 5, src))
