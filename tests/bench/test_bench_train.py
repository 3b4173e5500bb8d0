"""The train suite (dense autograd vs sparse_ffn_train, forward + backward with the L1 term) on the CPU, through the
torch reference: every field of its rows, the report files, the ELL width rule and the refusals."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from sparsify_cli.bench import train_ffn
from sparsify_cli.bench.settings import resolve
from sparsify_cli.cli.app import app
from sparsify_cli.kernels import cuda_kernels_status
from sparsify_cli.kernels import train_reference

runner = CliRunner()


def bench(*args):
    return runner.invoke(app, ["bench", *map(str, args)])


def test_train_suite_rows_have_every_field(tmp_path):
    out = tmp_path / "train.json"
    r = bench("--suite", "train", "--device", "cpu", "shapes=tiny", "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["settings"]["suite"] == "train" and report["settings"]["backend"] == "torch"
    assert report["train_backend"] == "torch" and "torch" in report["train_backends_available"]
    assert any("pure-torch reference" in n for n in report["notes"])
    rows = report["rows"]
    assert [(x["kind"], x["M"], x["nnz_target"]) for x in rows] == [("train", 64, 4.0), ("train", 64, 8.0)]
    for x in rows:
        assert (x["D"], x["H"], x["backend"], x["dtype"], x["gpu"]) == (64, 256, "torch", "float32", None)
        assert x["dense_ms"] > 0 and x["sparse_ms"] > 0
        assert x["speedup"] == pytest.approx(x["dense_ms"] / x["sparse_ms"])
        assert x["dense_tok_s"] == pytest.approx(64 / x["dense_ms"] * 1e3)
        assert x["dense_peak_mb"] is None and x["sparse_peak_mb"] is None  # CPU: not measured (a note says so)
        # fp32: the reference computes the dense function; each tensor within float rounding of dense autograd
        for k in ("out", "l1", "dx", "dgate", "dup", "ddown"):
            assert 0 <= x[f"err_{k}"] < 1e-5, (k, x[f"err_{k}"])
            assert x["ref_err"][k]["sparse"] < 1e-5 and x["ref_err"][k]["dense"] < 1e-5
        assert x["rel_err"] == max(x[f"err_{k}"] for k in ("out", "l1", "dx", "dgate", "dup", "ddown"))
        assert x["ref_dtype"] == "float64" and x["ref_err_ratio"] >= 0
        assert 0 < x["nnz_mean"] <= x["nnz_p99"] <= x["nnz_max"] <= x["H"]
        assert abs(x["nnz_mean"] - x["nnz_target"]) < 0.35 * x["nnz_target"]
        assert x["op_nnz_mean"] == pytest.approx(x["nnz_mean"])  # the op's counts of non-zero h
        assert x["width"] == train_ffn.ell_width(x["nnz_mean"]) == 64 and x["tail_rows"] == 0 == x["tail_share"]
        assert x["l1_coeff"] == 1.0 and "sparse_ffn_train(backend='torch'" in x["sparse_path"]
    with open(out.with_suffix(".csv")) as f:
        lines = list(csv.DictReader(f))
    assert [int(x["width"]) for x in lines] == [64, 64] and float(lines[0]["err_dx"]) == rows[0]["err_dx"]
    assert "training op" in r.output and "speed-up" in r.output


def test_rows_above_the_width_take_the_tail_and_stay_exact():
    s = resolve("train", "cpu", ["shapes=tiny", "nnz=8", "width=6", "reps=1", "warmup=0"])
    (label, run), = train_ffn.cases(s, torch.device("cpu"))
    row = run()
    assert row["width"] == 6 and "given" in row["width_rule"]
    assert 0 < row["tail_rows"] < row["M"] and row["tail_share"] == pytest.approx(row["tail_rows"] / row["M"])
    assert row["rel_err"] < 1e-5


def test_a_wrong_sparse_result_shows_in_the_errors(monkeypatch):
    """The row's check can fail: a backend whose output is 1% off shows it in out and in every gradient."""
    ref = train_reference.TRAIN_BACKENDS["torch"]

    def off(*args, **kwargs):
        res = ref(*args, **kwargs)
        return res._replace(out=res.out * 1.01)

    monkeypatch.setitem(train_reference.TRAIN_BACKENDS, "torch", off)
    s = resolve("train", "cpu", ["shapes=tiny", "nnz=8", "reps=1", "warmup=0"])
    row = train_ffn.cases(s, torch.device("cpu"))[0][1]()
    assert row["err_out"] == pytest.approx(0.01, rel=1e-3)
    assert row["err_ddown"] == pytest.approx(0.01, rel=1e-3)
    assert all(row[f"err_{k}"] > 1e-4 for k in ("dx", "dgate", "dup"))  # the L1 term's share is not scaled
    assert row["err_l1"] < 1e-5 and row["ref_err_ratio"] > 100


def test_the_l1_term_moves_the_gradients():
    """With gy of a token-mean loss and the presets' λ, the L1 term is a visible part of every gradient but
    Down's (so the suite's error check covers it)."""
    from sparsify_cli.bench.synthetic import make_ffn_inputs

    inp = make_ffn_inputs(256, 64, 256, 8.0, dtype=torch.float32)
    leaves = [t.detach().requires_grad_() for t in (inp.x, inp.gate, inp.up, inp.down)]
    gy = torch.randn(256, 64) / 256
    g1 = train_ffn.dense_step(*leaves, gy, torch.tensor(1.0))[2]
    g0 = train_ffn.dense_step(*leaves, gy, torch.tensor(0.0))[2]
    for a, b in zip(g1[:3], g0[:3]):
        assert (a - b).norm() > 0.2 * b.norm()
    assert torch.equal(g1[3], g0[3])


def test_ell_width_rule():
    nnz = (0, 5, 21.3, 21.4, 29, 56, 112, 170.6, 400)
    assert [train_ffn.ell_width(n) for n in nnz] == [64, 64, 64, 96, 96, 192, 352, 512, 512]
    assert all(train_ffn.ell_width(n) % 32 == 0 for n in range(0, 300, 7))


def test_default_preset_per_device():
    assert resolve("train", "cpu", []).shapes == "small" and resolve("train", "cpu", []).backend == "torch"
    s = resolve("train", "cuda", [])
    assert (s.shapes, s.backend, s.d_model, s.d_ffn, s.tokens, s.nnz) == ("paper", "cuda", 2048, 5632, (16384,),
                                                                           (29.0, 56.0, 112.0))
    assert resolve("train", "cuda", ["backend=torch", "tokens=4096"]).backend == "torch"


@pytest.mark.parametrize("args,message", [
    (["--suite", "train", "--device", "tpu"], "unknown device 'tpu'"),
    (["--suite", "train", "--device", "cpu", "backend=cuda"], "backend=cuda is the CUDA training op: it needs --device"),
    (["--suite", "train", "--device", "cpu", "backend=triton"], "backend='triton' is not a training backend"),
    (["--suite", "train", "--device", "cpu", "sparsity=0.9"], "does not apply to the train suite"),
    (["--suite", "train", "--device", "cpu", "decode=1"], "does not apply to the train suite"),
    (["--suite", "train", "--device", "cpu", "width=-1"], "width=-1 must be >= 0"),
    (["--suite", "train", "--device", "cpu", "shapes=paper", "nnz=5000"], "not reachable"),
    (["--suite", "train", "--device", "cpu", "tokens="], "needs tokens= and nnz="),
])
def test_bad_train_settings_are_one_line_errors(args, message):
    r = bench(*args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and r.output.strip().startswith("error:")


@pytest.mark.skipif(cuda_kernels_status()[0], reason="this machine can run the CUDA kernels")
def test_train_suite_on_cuda_without_a_gpu_says_why():
    r = bench("--suite", "train", "--device", "cuda")
    assert r.exit_code == 2
    assert f"--device cuda cannot run here: {cuda_kernels_status()[1]}" in " ".join(r.output.split())
