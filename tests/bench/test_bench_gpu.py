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
    for row in (pre, dec):  # the packed twin: narrower (the recipe leaves 30% of the neurons dead), nearly exact
        assert 0.6 * row["H"] < row["packed_width"] < 0.8 * row["H"] and row["packed_width"] % 64 == 0
        assert 0 <= row["packed_removed_share"] < 1e-2
        assert row["packed_speedup"] == pytest.approx(row["dense_ms"] / row["packed_ms"])
    assert pre["packed_rel_err"] < 2e-2 and dec["packed_rel_err_fp32_ref"] < 2e-2
    energy_measured = pre["dense_mj_tok"] is not None
    assert energy_measured or any("energy: not measured" in n for n in report["notes"])
    if "clocks" in report:  # each row's SM clock while busy, within the GPU's range
        for row in (pre, dec):
            assert 0 < row["sm_mhz_min"] <= row["sm_mhz_median"] <= report["clocks"]["sm_mhz_max"]
            assert 0 <= row["power_capped_share"] <= 1
        assert any(n.startswith("clocks: SM") for n in report["notes"])
    else:
        assert any(n.startswith("clocks: not recorded") for n in report["notes"])


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
        if row["kind"] in ("prefill", "decode"):
            assert row["dense_peak_mb"] > 0
    graphs = [(r["kind"], r["M"]) for r in report["rows"] if r["kind"] == "decode (graphs)"]
    assert graphs == [("decode (graphs)", 1), ("decode (graphs)", 64)]  # graphs=true is the default
    for row in report["rows"]:
        if row["kind"] == "decode (graphs)":
            assert row["replay_vs_eager_err"] < 1e-3  # the dense graph replays the eager step
            assert row["dense_peak_mb"] is None and "CUDA graph" in row["sparse_path"]
            assert 0 <= row["sparse_layers"] <= row["layers"] and row["speedup"] > 0


def _train_rows(tmp_path, *settings):
    out = tmp_path / "train.json"
    r = CliRunner().invoke(app, ["bench", "--suite", "train", *settings, "--out", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def test_train_suite_cuda_op(tmp_path):
    from sparsify_cli.bench.train_ffn import cuda_op_status
    from sparsify_cli.train.ffn_kernels import ell_width

    ok, why = cuda_op_status()
    if not ok and "is not available" in why:  # the op is not in this installation; any other failure is a failure
        pytest.skip(why)
    report = _train_rows(tmp_path, "shapes=quick", "tokens=2048", "nnz=29,112", "reps=3", "warmup=1")
    assert report["train_backend"] == "cuda" and report["environment"]["gpu"]
    for x in report["rows"]:
        assert (x["backend"], x["dtype"], x["gpu"]) == ("cuda", "bfloat16", report["environment"]["gpu"])
        assert x["dense_ms"] > 0 and x["sparse_ms"] > 0 and x["dense_peak_mb"] > 0 and x["sparse_peak_mb"] > 0
        assert x["width"] == ell_width(x["nnz_mean"]) and 0 <= x["tail_rows"] < x["M"]
        assert x["op_nnz_mean"] == pytest.approx(x["nnz_mean"], rel=2e-2)  # bf16 gate GEMMs may round apart
        assert x["rel_err"] < 5e-2 and x["ref_err_sparse"] < 5e-2 and x["ref_err_dense"] < 5e-2


def test_train_suite_torch_reference_on_the_gpu(tmp_path):
    """backend=torch on the GPU: the reference in bf16 (the suite's GPU code path without the CUDA op)."""
    report = _train_rows(tmp_path, "--device", "cuda", "backend=torch", "shapes=quick", "tokens=1024", "nnz=112",
                         "width=64", "reps=2", "warmup=0")
    (x,) = report["rows"]
    assert x["backend"] == "torch" and x["dtype"] == "bfloat16" and x["dense_peak_mb"] > 0
    assert x["width"] == 64 and x["tail_rows"] > 0 and x["rel_err"] < 0.1


def test_kernel_ms_reports_the_gpu_time_of_each_kernel():
    import torch

    from sparsify_cli.bench.measure import kernel_ms

    a = torch.randn(1024, 1024, device="cuda")
    per = kernel_ms(lambda: a @ a)
    assert per and all(v > 0 for v in per.values())
    assert list(per.values()) == sorted(per.values(), reverse=True)


def test_policy_suite_measures_and_writes_this_gpus_rule(tmp_path, monkeypatch):
    import torch

    from sparsify_cli.kernels import device_policy as dp

    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "cache"))  # not the machine's cache
    out = tmp_path / "policy.json"
    r = CliRunner().invoke(app, ["bench", "--suite", "policy", "shapes=quick", "nnz=16,96", "decode=16,64", "reps=5",
                                 "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {x["policy_kind"] for x in rows} == {"prefill", "fused_decode", "decode"}
    for row in rows:
        assert row["rel_err"] < 2e-2 and row["dense_ms"] > 0 and row["sparse_ms"] > 0
        assert row["density"] == pytest.approx(row["nnz_mean"] / row["H"])
    # the file holds what the rows give, and a packed model on this GPU would now use it
    path = dp.policy_path(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    assert report["policy"]["path"] == str(path) and path.exists()
    for kind, field in dp.LIMIT_FIELDS.items():
        pts = [x for x in rows if x["policy_kind"] == kind]
        assert report["policy"]["limits"][field] == dp.crossover(pts)
    policy, note = dp.for_device()
    assert policy.max_density == report["policy"]["limits"]["max_density"] and "measured on this" in note


def test_ffn_bench_calibrate_is_the_policy_suites_sweep_and_rule(tmp_path, monkeypatch):
    """python -m sparsify_cli.bench.ffn's calibration runs the policy suite's points and device_policy.crossover: one
    sweep and one rule, whichever tool reports the limits; and it writes no policy file."""
    import torch

    from sparsify_cli.bench import ffn
    from sparsify_cli.kernels import device_policy as dp

    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "cache"))
    c = ffn.calibrate(reps=3, overrides=("shapes=quick", "nnz=16,96", "decode=16,64"))
    for kind in ("prefill", "fused_decode", "decode"):
        assert c[kind], kind
        for row in c[kind]:
            assert row["dense_ms"] > 0 and row["sparse_ms"] > 0 and 0 < row["density"] < 1
        assert c[f"{kind}_max_density"] == dp.crossover(c[kind])
    assert not dp.policy_path(torch.cuda.get_device_name(), torch.cuda.get_device_capability()).exists()
