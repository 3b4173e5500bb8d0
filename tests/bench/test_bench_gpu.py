"""`sparsify bench` on a GPU: the ffn and model suites end to end (skipped without a CUDA GPU and CuPy).

Run on the GPU machine: python -m pytest -q tests/bench/test_bench_gpu.py
"""

import json

import pytest
from typer.testing import CliRunner

from sparsify_cli.cli.app import app
from sparsify_cli.kernels import cuda_kernels_status

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not cuda_kernels_status()[0], reason=f"CUDA kernels: {cuda_kernels_status()[1]}")]


def test_ffn_suite_quick(tmp_path):
    out = tmp_path / "ffn.json"
    r = CliRunner().invoke(app, ["bench", "--suite", "ffn", "shapes=quick", "nnz=29", "decode=1", "reps=5",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["environment"]["gpu"] and report["environment"]["cupy"] and report["environment"]["driver"]
    rows = {x["kind"]: x for x in report["rows"]}
    pre, dec = rows["prefill"], rows["decode"]
    assert pre["M"] == 4096 and 20 < pre["nnz_mean"] < 40 and pre["dense_peak_mb"] > 0 and pre["sparse_peak_mb"] > 0
    assert pre["rel_err"] < 2e-2 and pre["rel_err_fp32_ref"] <= 2 * pre["rel_err_torch_bf16"] + 1e-4
    assert "detail" in pre and pre["detail"]["dense_ms"] > 0
    assert dec["M"] == 1 and dec["rel_err"] < 2e-2 and dec["speedup"] == pytest.approx(dec["dense_ms"] / dec["sparse_ms"])
    energy_measured = pre["dense_mj_tok"] is not None
    assert energy_measured or any("energy: not measured" in n for n in report["notes"])


def test_model_suite_tiny_on_the_gpu(tmp_path):
    out = tmp_path / "model.json"
    r = CliRunner().invoke(app, ["bench", "--suite", "model", "--device", "cuda", "shapes=tiny", "d_model=256",
                                 "d_ffn=1024", "decode=1,64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["ffn_backend"] == "cuda"
    for row in report["rows"]:
        if row["kind"] != "train":
            assert row["rel_err"] < 3e-2  # bf16 model vs bf16 model
            assert row["dense_peak_mb"] > 0
