import pytest
import torch

from sparsify_cli.eval.activations import ActivationRecorder, eval_tile, model_sparsity, twell_capacity
from sparsify_cli.formats import pack_twell


def _sparse(n, h, density, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, h, generator=g)
    a[torch.rand(n, h, generator=g) > density] = 0
    return a


@pytest.mark.parametrize("h,tile", [(512, 256), (300, 256), (96, 96), (40, 64)])
def test_overflow_matches_twell_packing(h, tile):
    # Densities that put some tiles over capacity at C = 8 but not all: the counts must be exactly TwELL's.
    rec = ActivationRecorder()
    rec.begin()
    chunks = [_sparse(37, h, d, s) for s, d in enumerate((0.02, 0.15, 0.6, 0.9))]
    for c in chunks:
        rec(0, c.view(1, -1, h))
    rec.end()
    (layer,) = rec.layer_reports()
    a = torch.cat(chunks)
    assert layer["tiles"]["tile"] == tile == eval_tile(h)
    for comp in (8, 4, 2):
        tw = pack_twell(a, tile=tile, compression=comp)
        o = layer["tiles"]["overflow"][str(comp)]
        assert o["capacity"] == tw.capacity == twell_capacity(tile, comp)
        assert o["tile_fraction"] == pytest.approx(tw.n_overflow_tiles / (a.shape[0] * tw.n_tiles))
        assert o["token_fraction"] == pytest.approx(float(tw.row_overflow.double().mean()))
    assert layer["tiles"]["overflow"]["8"]["tile_fraction"] > layer["tiles"]["overflow"]["2"]["tile_fraction"] > 0
    counts = (a != 0).sum(-1).double()
    assert layer["mean_active"] == pytest.approx(float(counts.mean()))
    assert layer["max_active"] == int(counts.max())
    assert layer["p99_active"] == pytest.approx(float(torch.quantile(counts, 0.99)))
    assert sum(layer["active_hist"]) == a.shape[0] and layer["active_hist"][int(counts.max())] >= 1


def test_dead_neurons_and_collecting_window():
    rec = ActivationRecorder()
    h = _sparse(50, 64, 0.5, 0)
    h[:, :10] = 0  # 10 neurons never fire
    rec(0, h.view(5, 10, 64))  # not collecting: ignored
    assert rec.n_tokens() == 0
    rec.begin()
    rec(0, h.view(5, 10, 64))
    rec(1, torch.zeros(5, 10, 64))
    rec.end()
    rec(0, torch.ones(5, 10, 64))  # after end(): ignored
    l0, l1 = rec.layer_reports()
    assert (l0["dead"], l1["dead"], l1["mean_active"]) == (10, 64, 0.0)
    assert l0["tokens"] == 50 and l0["dead_fraction"] == pytest.approx(10 / 64)
    summary = model_sparsity([l0, l1])
    assert summary["sparsity"] == pytest.approx(1 - (l0["active_fraction"] + 0) / 2)
    assert summary["dead_fraction"] == pytest.approx(74 / 128)


def test_pruned_width_counts_as_dead_in_the_source():
    # A packed layer runs 40 of its source's 64 neurons: sparsity and dead neurons are reported against 64.
    rec = ActivationRecorder()
    rec.begin()
    rec(0, torch.ones(1, 4, 40))
    rec.end()
    (layer,) = rec.layer_reports(source_widths=[64])
    assert (layer["d_ffn"], layer["d_ffn_run"], layer["dead"]) == (64, 40, 24)
    assert layer["active_fraction"] == pytest.approx(40 / 64)


def test_tile_choice():
    assert [eval_tile(h) for h in (5632, 512, 256, 200, 96, 20)] == [256, 256, 256, 224, 96, 32]
    assert eval_tile(512, preferred=128) == 128
