"""`sparsify bench` through Typer's CliRunner: tiny suites on the CPU, the report files, and bad input."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from sparsify_cli.cli.app import app
from sparsify_cli.kernels import cuda_kernels_status

runner = CliRunner()


def bench(*args):
    return runner.invoke(app, ["bench", *map(str, args)])


def test_cpu_suite_writes_json_csv_and_plot(tmp_path):
    out, png = tmp_path / "r" / "cpu.json", tmp_path / "speedup.png"
    r = bench("--suite", "cpu", "shapes=tiny", "tokens=16,32", "--out", out, "--plot", png)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["format"] == "sparsify-bench" and report["settings"]["suite"] == "cpu"
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["torch_threads"] == 1
    rows = report["rows"]
    assert [(x["kind"], x["M"]) for x in rows] == [("decode", 1), ("prefill", 16), ("prefill", 32)]
    for x in rows:
        assert x["dense_ms"] > 0 and x["sparse_ms"] > 0
        assert x["speedup"] == pytest.approx(x["dense_ms"] / x["sparse_ms"])
        assert x["rel_err"] < 1e-5  # fp32: the sparse path computes the same function
        assert 0 < x["nnz_mean"] <= x["nnz_max"] <= x["H"] and x["sparsity"] == pytest.approx(1 - x["nnz_mean"] / 256)
        assert x["dense_peak_mb"] is None and x["dense_mj_tok"] is None  # CPU: not measured, and said so
    assert any("energy" in n for n in report["notes"]) and any("peak memory" in n for n in report["notes"])
    with open(out.with_suffix(".csv")) as f:
        lines = list(csv.DictReader(f))
    assert [int(x["M"]) for x in lines] == [1, 16, 32] and float(lines[1]["dense_ms"]) == rows[1]["dense_ms"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "speed-up" in r.output and "prefill" in r.output and "note: energy" in r.output


def test_model_suite_synthetic_rows(tmp_path):
    out = tmp_path / "model.json"
    r = bench("--suite", "model", "decode=1,8", "reps=2", "warmup=0", "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["model_source"] == "synthetic" and report["ffn_backend"] == "torch"
    rows = {(x["kind"], x["M"]): x for x in report["rows"]}
    assert set(rows) == {("prefill", 256), ("decode", 1), ("decode", 8), ("train", 256)}
    assert report["settings"]["graphs"] is True  # the CUDA-graph decode rows: skipped on the CPU, and said so
    assert "decode (graphs): not run (CUDA graphs need a GPU (--device cuda)); the decode rows ran eagerly" in (
        report["notes"])
    pre = rows[("prefill", 256)]
    assert abs(pre["sparsity"] - 0.98) < 0.005  # target 0.98, measured on the row's own tokens
    assert abs(rows[("decode", 8)]["sparsity"] - 0.98) < 0.015
    assert pre["rel_err"] < 1e-5 and pre["dense_tok_s"] == pytest.approx(256 / pre["dense_ms"] * 1e3)
    train = rows[("train", 256)]  # dense FFNs vs every FFN on the sparse training op (the torch reference here)
    assert train["dense_ms"] > 0 and train["sparse_ms"] > 0 and train["sparse_backend"] == "torch"
    assert train["speedup"] == pytest.approx(train["dense_ms"] / train["sparse_ms"])
    assert train["rel_err"] < 1e-5 and train["loss_sparse"] == pytest.approx(train["loss_dense"], rel=1e-6)
    assert train["sparse_nnz_mean"] == pytest.approx(train["dense_nnz_mean"]) and 5 < train["sparse_nnz_mean"] < 15
    assert train["sparse_width"] == [64, 64] and "sparse training op" in train["notes"]


@pytest.mark.parametrize("args,message", [
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--suite", "cpu", "foo=1"], "unknown setting 'foo'"),
    (["--suite", "cpu", "reps=many"], "reps='many': expected an integer"),
    (["--suite", "cpu", "sparsity=0.9"], "does not apply to the cpu suite"),
    (["--suite", "cpu", "shapes=huge"], "shapes='huge' is not a preset"),
    (["--suite", "cpu", "nnz=500", "shapes=tiny"], "not reachable"),
    (["--suite", "model", "sparsity=1.5"], "between 0.65 and 1"),
    (["--suite", "model", "sparsity=0.5"], "between 0.65 and 1"),
    (["--suite", "cpu", "--device", "cuda"], "the cpu suite runs on the CPU"),
    (["--wandb", "maybe"], "--wandb 'maybe' is not valid"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    r = bench(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output and r.output.strip().startswith("error:")


@pytest.mark.skipif(cuda_kernels_status()[0], reason="this machine can run the CUDA kernels")
@pytest.mark.parametrize("args", [["--suite", "ffn"], ["--suite", "model", "--device", "cuda"]])
def test_cuda_without_kernels_says_why(args):
    r = bench(*args)
    assert r.exit_code == 2
    assert f"cannot run here: {cuda_kernels_status()[1]}" in " ".join(r.output.split())


def test_a_path_that_is_no_model_is_refused(tmp_path):
    (tmp_path / "stuff").mkdir()
    r = bench("--suite", "model", tmp_path / "stuff")
    assert r.exit_code == 2 and "neither a sparsify checkpoint" in r.output
    r = bench(tmp_path / "missing")  # a path alone means the model suite
    assert r.exit_code == 2 and "does not exist" in r.output
    r = bench("--suite", "cpu", tmp_path / "stuff")
    assert r.exit_code == 2 and "only applies to --suite model" in r.output


def test_wandb_logging_goes_through_the_training_metrics_sink(monkeypatch, tmp_path):
    logged = {}

    class FakeSink:
        def __init__(self, run_dir, jsonl, wandb_cfg, run_name, config, wandb_id=None, warn=print):
            logged.update(mode=wandb_cfg.mode, name=run_name, config=config, run_dir=run_dir, steps=[])

        def log(self, step, metrics):
            logged["steps"].append((step, metrics))

        def close(self):
            logged["closed"] = True

    monkeypatch.setattr("sparsify_cli.train.metrics.MetricsSink", FakeSink)
    r = bench("--suite", "cpu", "shapes=tiny", "--wandb", "offline", "--out", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert logged["mode"] == "offline" and logged["name"] == "bench-cpu-tiny" and logged["closed"]
    assert logged["run_dir"] == tmp_path and logged["config"]["settings"]["suite"] == "cpu"
    assert [s for s, _ in logged["steps"]] == [0, 1]
    assert logged["steps"][1][1]["M"] == 16 and logged["steps"][1][1]["dense_ms"] > 0
