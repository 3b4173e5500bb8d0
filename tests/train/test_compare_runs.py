"""tests/gpu/compare_runs.py (the GPU script's comparison of a kernels=cuda run with a kernels=torch one), on
synthetic metrics.jsonl files written the way the trainer writes them."""

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "gpu" / "compare_runs.py"
_spec = importlib.util.spec_from_file_location("compare_runs", _PATH)
cr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cr)


def write_run(path: Path, lines: list[dict], summary: dict | None = None, junk: str = "") -> Path:
    path.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in lines) + junk
    (path / "metrics.jsonl").write_text(text)
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def rec(step, ce, tps, sparse=None, widths=None, mem=None):
    r = {"step": step, "ce": ce, "l1": 1.0, "l1_coeff": 0.1, "tokens_per_s": tps, "sparsity": 0.9,
         "layer0/active_mean": 5.0, "layer1/active_mean": 6.0}
    if sparse is not None:
        r["kernels/sparse_layers"] = sparse
        for i, w in enumerate(widths):
            r[f"layer{i}/ell_width"] = w
    if mem is not None:
        r["memory/peak_gib"] = mem
    return r


@pytest.fixture
def runs(tmp_path):
    cuda = write_run(tmp_path / "cuda", [
        rec(10, 5.0, 100.0, 0, [0, 0], mem=9.0),
        rec(20, 4.0, 1000.0, 1, [0, 64], mem=5.0),
        rec(30, 3.3, 2000.0, 2, [64, 96], mem=4.0),
        rec(40, 3.0, 4000.0, 2, [64, 64], mem=3.0),
        {"step": 40, "heldout_ce": 3.1, "heldout_sparsity": 0.99, "heldout_active_mean": 1.5},
    ], {"train_kernels": "cuda", "heldout_ce": 3.1, "heldout_sparsity": 0.99})
    torch_run = write_run(tmp_path / "torch", [
        rec(10, 5.0, 100.0, mem=9.5), rec(20, 4.1, 1000.0, mem=9.0), rec(30, 3.0, 1000.0, mem=9.0),
    ], None, junk='{"step": 40, "ce": 2.')  # killed while writing step 40: no summary, a cut line
    return cuda, torch_run


def test_tokens_per_s_median_after_warmup_and_time_weighted_last_steps(runs):
    train = cr.train_records(cr.read_records(runs[0]))
    assert cr.tokens_per_s_median(train, skip_steps=10) == 2000.0  # windows (10,20], (20,30], (30,40]
    assert cr.tokens_per_s_median(train, skip_steps=0) == pytest.approx(1500.0)
    # last 20 steps: windows (20,30] at 2000/s and (30,40] at 4000/s -> 20 steps in 10/2000 + 10/4000 s
    assert cr.tokens_per_s_last(train, 20) == pytest.approx(20 / (10 / 2000 + 10 / 4000))
    assert cr.tokens_per_s_last([], 20) is None


def test_sparse_switches_per_layer(runs):
    train = cr.train_records(cr.read_records(runs[0]))
    sw = cr.sparse_switches(train, 2)
    assert sw["changes"] == [[10, 0], [20, 1], [30, 2]]
    assert sw["first_step_with_at_least"] == {"1": 20, "2": 30}
    assert sw["all_sparse_from_step"] == 30
    assert sw["per_layer"]["0"] == {"first_sparse_step": 30, "sparse_share_of_log_lines": 0.5, "last_ell_width": 64}
    assert sw["per_layer"]["1"]["first_sparse_step"] == 20
    assert cr.sparse_switches(cr.train_records(cr.read_records(runs[1])), 2) is None  # kernels=torch: no policy


def test_compare_partial_reference(runs):
    result = cr.compare(runs[0], runs[1], skip_steps=10, last_steps=20)
    a, b = result["runs"]["candidate"], result["runs"]["reference"]
    assert a["complete"] and not b["complete"] and b["steps"] == 30 and b["log_lines"] == 3
    assert a["n_layers"] == 2 and a["train_kernels"] == "cuda" and b["train_kernels"] is None
    assert a["peak_memory_gib"] == 9.0 and a["peak_memory_gib_last"] == 4.0  # last 20 steps: (20,30], (30,40]
    assert b["peak_memory_gib_last"] == 9.0  # its last 20 steps are (10,20], (20,30]
    assert a["final_heldout_ce"] == 3.1 and b["final_heldout_ce"] is None
    assert a["sparse_layers_last_steps"] == [2, 2]
    ag = result["agreement"]
    s = ag["all_logged_steps"]  # steps 10, 20, 30 in both; 40 only in the candidate
    assert s["n"] == 3 and s["max_abs"] == pytest.approx(0.3) and s["mean_abs"] == pytest.approx(0.4 / 3)
    assert s["max_rel"] == pytest.approx(0.1) and ag["worst_step"] == 30
    assert ag["steps_with_sparse_layers"]["n"] == 2  # steps 20 and 30
    assert ag["final_heldout_ce"] == {"abs": None, "rel": None}
    assert result["speedup"]["tokens_per_s_median"] == pytest.approx(2000 / 1000)
    assert "tiny" in cr.table("tiny", result)


def test_main_updates_the_json_and_fails_on_a_run_without_metrics(runs, tmp_path, capsys):
    out = tmp_path / "train_runs.json"
    out.write_text(json.dumps({"other": {"kept": True}}))
    assert cr.main([str(runs[0]), str(runs[1]), "--json", str(out), "--name", "tiny", "--skip-steps", "10"]) == 0
    data = json.loads(out.read_text())
    assert data["other"] == {"kept": True} and data["tiny"]["runs"]["candidate"]["steps"] == 40
    assert "cuda" in capsys.readouterr().out
    assert cr.main([str(runs[0]), str(tmp_path / "missing"), "--json", str(out), "--name", "paper"]) == 1
    data = json.loads(out.read_text())
    assert set(data) == {"other", "tiny", "paper"} and data["paper"]["runs"]["reference"]["log_lines"] == 0
    assert cr._stats([(1.0, 0.0)])["max_rel"] is None  # a zero reference has no relative difference
