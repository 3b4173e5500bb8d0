"""Hybrid ELL + dense tail and its neuron-major (CSC) transpose."""

import pytest
import torch

from sparsify_cli.formats.hybrid import COL_PAD, HybridELL, pack_hybrid, transpose_hybrid, unpack_hybrid, unpack_hybrid_t


def activations(m, h, density, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, h, generator=g).abs() + 0.01
    return torch.where(torch.rand(m, h, generator=g) < density, a, torch.zeros(())).to(dtype)


@pytest.mark.parametrize(
    "m,h,width,density,dtype",
    [(1, 64, 8, 0.05, torch.float32), (50, 300, 16, 0.05, torch.float32), (64, 1000, 32, 0.03, torch.bfloat16),
     (17, 777, 128, 0.2, torch.float32), (8, 50, 1, 0.02, torch.float16)],
)
def test_round_trip_is_exact_and_tail_holds_whole_rows(m, h, width, density, dtype):
    a = activations(m, h, density, seed=m + h + width, dtype=dtype)
    hy = pack_hybrid(a, width=width)
    counts = (a != 0).sum(dim=1)
    assert torch.equal(hy.counts, counts.to(torch.int32))
    assert torch.equal(hy.tail_rows, (counts > width).nonzero().squeeze(1))
    assert hy.n_tail_rows == int((counts > width).sum())
    assert torch.equal(hy.tail, a[hy.tail_rows])
    assert hy.values.dtype == dtype
    assert torch.equal(unpack_hybrid(hy), a)
    # ELL rows: entries in ascending column order, then padding (value 0, col -1); tail rows: padding only
    for r in range(m):
        n = int(counts[r]) if counts[r] <= width else 0
        cols = (a[r] != 0).nonzero().squeeze(1)
        assert hy.cols[r, :n].tolist() == cols[:n].tolist()
        assert (hy.cols[r, n:] == COL_PAD).all() and (hy.values[r, n:] == 0).all()


def test_tail_routing_at_the_boundary():
    a = torch.zeros(3, 40)
    a[0, :4] = 1.0  # exactly W: ELL
    a[1, 10:15] = 2.0  # W + 1: tail
    a[2, 39] = 3.0
    hy = pack_hybrid(a, width=4)
    assert hy.tail_rows.tolist() == [1] and hy.in_tail.tolist() == [False, True, False]
    assert hy.cols[0].tolist() == [0, 1, 2, 3] and hy.cols[1].tolist() == [COL_PAD] * 4
    assert hy.cols[2].tolist() == [39, COL_PAD, COL_PAD, COL_PAD]
    assert torch.equal(unpack_hybrid(hy), a)


def test_every_row_in_the_tail_and_none():
    a = activations(10, 30, 0.9, seed=1)
    assert pack_hybrid(a, width=2).n_tail_rows == 10
    assert torch.equal(unpack_hybrid(pack_hybrid(a, width=2)), a)
    assert pack_hybrid(a, width=30).n_tail_rows == 0
    assert pack_hybrid(torch.zeros(0, 30)).values.shape == (0, 128)


def test_nan_is_kept():
    a = torch.zeros(2, 20)
    a[0, 3] = float("nan")
    a[0, 4] = -0.0  # == 0: not an entry
    a[1, :5] = float("nan")
    hy = pack_hybrid(a, width=2)
    assert hy.counts.tolist() == [1, 5] and hy.tail_rows.tolist() == [1]
    out = unpack_hybrid(hy)
    assert out.isnan().sum() == 6 and out[0, 3].isnan()


@pytest.mark.parametrize("m,h,width,density", [(1, 64, 8, 0.1), (40, 300, 16, 0.05), (33, 200, 60, 0.3)])
def test_transposed_form(m, h, width, density):
    a = activations(m, h, density, seed=7 * m + h)
    hy = pack_hybrid(a, width=width)
    t = transpose_hybrid(hy)
    assert m == 1 or 0 < hy.n_tail_rows < m  # both parts in use
    assert torch.equal(unpack_hybrid_t(t), a)
    assert torch.equal(t.counts, (a != 0).sum(dim=0))
    assert t.col_ptr[0] == 0 and t.col_ptr[-1] == t.nnz == int((a != 0).sum())
    for j in range(h):  # tokens ascending within each neuron
        seg = t.rows[t.col_ptr[j] : t.col_ptr[j + 1]].to(torch.int64)
        assert torch.equal(seg, (a[:, j] != 0).nonzero().squeeze(1))
    # src points at the same value in the row-major storage (ELL slots, then the tail)
    flat = torch.cat([hy.values.reshape(-1), hy.tail.reshape(-1)])
    assert torch.equal(flat[t.src], t.values)
    assert t.src.unique().numel() == t.nnz


def test_invalid_arguments():
    with pytest.raises(ValueError, match="2-D"):
        pack_hybrid(torch.zeros(5))
    with pytest.raises(ValueError, match="width"):
        pack_hybrid(torch.zeros(2, 5), width=0)
    with pytest.raises(ValueError, match="floating"):
        pack_hybrid(torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="cols"):
        HybridELL(values=torch.zeros(2, 4), cols=torch.zeros(2, 4, dtype=torch.int64),
                  counts=torch.zeros(2, dtype=torch.int32), tail_rows=torch.zeros(0, dtype=torch.int64),
                  tail=torch.zeros(0, 9), n_cols=9)
