"""The speed-up plot's series: one per (kind, tokens per call), the ffn suite's packed twins beside them."""

from sparsify_cli.bench.report import plot_series, write_plot


def _report(rows):
    return {"rows": rows, "environment": {"gpu": "test GPU"}, "settings": {"suite": "ffn"}}


def test_series_group_rows_and_add_packed_twins(tmp_path):
    rows = [
        {"kind": "prefill", "M": 16, "sparsity": 0.99, "speedup": 1.3, "packed_speedup": 1.6},
        {"kind": "prefill", "M": 16, "sparsity": 0.98, "speedup": 1.1, "packed_speedup": 1.4},
        {"kind": "decode", "M": 1, "sparsity": 0.995, "speedup": 2.2},
        {"kind": "train", "M": 16, "sparsity": 0.99, "speedup": None},  # no sparse time: not plotted
        {"kind": "prefill", "M": 4, "layers": 2, "sparsity": 0.97, "speedup": 1.05},
    ]
    series = plot_series(_report(rows))
    assert series == {
        "prefill M=16": [(98.0, 1.1), (99.0, 1.3)],
        "prefill M=16, packed": [(98.0, 1.4), (99.0, 1.6)],
        "decode M=1": [(99.5, 2.2)],
        "prefill M=4 (2 layers)": [(97.0, 1.05)],
    }
    png = write_plot(_report(rows), tmp_path / "plot.png")
    assert png.stat().st_size > 0
