"""The pieces every row is made of: the comparison, the statistics, the settings, energy."""

import pytest
import torch

from sparsify_cli.bench import energy as energy_mod
from sparsify_cli.bench.measure import compare, cpu_median_ms, nnz_stats, rel_err
from sparsify_cli.bench.settings import resolve
from sparsify_cli.errors import UserError


def test_compare_reports_a_wrong_sparse_output():
    x = torch.randn(8, 16)
    good = compare(lambda: x * 2, lambda: x + x, device=torch.device("cpu"), tokens=8, reps=2, warmup=0)
    bad = compare(lambda: x * 2, lambda: x * 2.2, device=torch.device("cpu"), tokens=8, reps=2, warmup=0)
    assert good["rel_err"] == 0.0 and bad["rel_err"] == pytest.approx(0.1, rel=1e-5)
    assert good["speedup"] == pytest.approx(good["dense_ms"] / good["sparse_ms"])
    assert good["dense_tok_s"] == pytest.approx(8 / good["dense_ms"] * 1e3)


def test_cpu_median_is_the_median_of_each_function(monkeypatch):
    clock = iter(range(1000))
    monkeypatch.setattr("sparsify_cli.bench.measure.time.perf_counter", lambda: next(clock) * 1e-3)
    calls = []
    t = cpu_median_ms({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3, warmup=1)
    assert calls == ["a", "b"] * 4  # warm-up, then interleaved
    assert t == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}


def test_nnz_stats_counts_per_token_and_per_tile():
    a = torch.zeros(3, 300)
    a[0, :5] = 1.0
    a[1, 250:262] = 0.5  # 6 in tile 0, 6 in tile 1
    a[2, 10] = -1.0  # not active (gate pre-activation <= 0)
    s = nnz_stats(a, tile=256)
    assert s["nnz_mean"] == pytest.approx(17 / 3) and s["nnz_max"] == 12 and s["max_per_tile"] == 6
    assert s["sparsity"] == pytest.approx(1 - 17 / 900)
    assert rel_err(torch.ones(4), torch.ones(4) * 2) == pytest.approx(0.5)


def test_settings_presets_and_overrides():
    s = resolve("cpu", "cpu", ["shapes=tiny", "tokens=4,8", "nnz=3.5"])
    assert (s.d_model, s.d_ffn, s.tokens, s.nnz, s.reps) == (64, 256, (4, 8), (3.5,), 3)
    assert resolve("ffn", "cuda", []).shapes == "paper" and resolve("model", "cpu", []).shapes == "tiny"
    assert resolve("model", "cuda", []).d_ffn == 5632
    assert resolve("ffn", "cuda", ["detail=false"]).detail is False
    with pytest.raises(UserError, match="expected true or false"):
        resolve("ffn", "cuda", ["detail=maybe"])
    with pytest.raises(UserError, match="split into heads"):
        resolve("model", "cpu", ["heads=3"])


def test_energy_on_the_cpu_is_a_note_not_an_error():
    m = energy_mod.EnergyMeter("cpu")
    assert not m.available and "CPU" in m.note
    assert m.mj_per_token(lambda: None, tokens=10, est_ms=1.0) is None


def test_energy_per_token_from_the_counter(monkeypatch):
    m = energy_mod.EnergyMeter("cpu")
    readings = iter([1000, 1600])

    class FakeNVML:
        @staticmethod
        def nvmlDeviceGetTotalEnergyConsumption(handle):
            return next(readings)

    m._nvml, m.handle = FakeNVML, object()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []
    mj = m.mj_per_token(lambda: calls.append(1), tokens=5, est_ms=100.0, min_seconds=1.0)
    assert len(calls) == 11 and mj == pytest.approx(600 / (11 * 5))


def test_ffn_train_row_times_the_dense_backward_on_the_cpu():
    from sparsify_cli.bench.suites import ffn_train_row

    s = resolve("cpu", "cpu", ["shapes=tiny"])
    row = ffn_train_row(s, 32, 8.0, torch.device("cpu"))
    assert row["kind"] == "train" and row["dense_ms"] > 0 and row["sparse_ms"] is None and row["speedup"] is None
    assert 4 < row["nnz_mean"] < 12 and "dense torch eager" in row["notes"]
