"""The dense/sparse rule measured per GPU (kernels/device_policy.py, bench/policy.py): the crossover rule, the
policy file (written atomically, refused with the reason when wrong), and its use by packed models. CPU only: the
GPU is stood in for by its name and capability; tests/bench/test_bench_gpu.py measures a real one."""

import json

import pytest
import torch
from typer.testing import CliRunner

from sparsify_cli.bench import settings as bs
from sparsify_cli.cli.app import app
from sparsify_cli.errors import UserError
from sparsify_cli.kernels import device_policy as dp
from sparsify_cli.kernels.ffn import DEFAULT_POLICY

GPU, CC = "NVIDIA Test GPU 80GB", (9, 0)


def pts(*triples, m=16384):
    return [{"M": m, "density": d, "dense_ms": dense, "sparse_ms": sparse} for d, dense, sparse in triples]


def test_crossover_takes_the_largest_density_that_pays_with_every_lower_one():
    # pays at 0.3% and 0.5% (0.97 margin), not at 0.7%: the island at 0.9% does not count
    points = pts((0.005, 1.0, 0.96), (0.003, 1.0, 0.5), (0.007, 1.0, 0.98), (0.009, 1.0, 0.9))
    assert dp.crossover(points) == 0.005
    assert dp.crossover(pts((0.003, 1.0, 1.2), (0.005, 1.0, 0.5))) == 0.0  # loses at the lowest: never sparse
    assert dp.crossover(pts((0.01, 2.0, 1.0), (0.02, 2.0, 1.9))) == 0.02
    with pytest.raises(ValueError):
        dp.crossover([])


def test_build_takes_the_lowest_crossover_over_token_counts():
    doc = dp.build({"decode": pts((0.01, 1, 0.5), (0.03, 1, 0.9), m=17) + pts((0.01, 1, 0.5), (0.03, 1, 0.99), m=64)},
                   GPU, CC, {"date_utc": "2026-12-04T00:00:00Z"})
    assert doc["limits"] == {"decode_max_density": 0.01}
    assert doc["format"] == dp.FORMAT and doc["gpu"] == GPU and doc["capability"] == [9, 0]
    assert doc["kernels_sha256"] == dp.kernels_digest() and len(doc["kernels_sha256"]) == 64
    with pytest.raises(ValueError, match="unknown kinds"):
        dp.build({"training": pts((0.01, 1, 0.5))}, GPU, CC, {})


def _write(tmp_path, limits=None, **changes):
    limits = limits or {"max_density": 0.009, "decode_max_density": 0.02, "fused_decode_max_density": 0.08}
    doc = {"format": dp.FORMAT, "format_version": dp.VERSION, "gpu": GPU, "capability": list(CC), "limits": limits,
           "environment": {"date_utc": "2026-12-04T00:00:00Z"}, **changes}
    path = dp.policy_path(GPU, CC, str(tmp_path))
    dp.save(doc, path)
    return path


def test_policy_file_round_trip_and_its_place_in_the_cache(tmp_path):
    path = _write(tmp_path)
    assert path == tmp_path / "policy" / "nvidia-test-gpu-80gb-sm90.json"
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary name, moved into place
    policy, doc = dp.load(path, GPU, CC)
    assert (policy.max_density, policy.decode_max_density, policy.fused_decode_max_density) == (0.009, 0.02, 0.08)
    assert policy.decode_max_m == DEFAULT_POLICY.decode_max_m  # the rest stays the defaults'


@pytest.mark.parametrize("change, message", [
    ({"gpu": "NVIDIA Other"}, "measured on 'NVIDIA Other'"),
    ({"capability": [8, 0]}, "measured on"),
    ({"format_version": 99}, "format version 99"),
    ({"format": "something-else"}, "is not a sparsify-device-policy file"),
    ({"limits": {"max_density": 0.01}}, "does not hold the limits"),
    ({"limits": {"max_density": 1.5, "decode_max_density": 0.02, "fused_decode_max_density": 0.06}}, "not a density"),
    ({"limits": {"max_density": True, "decode_max_density": 0.02, "fused_decode_max_density": 0.06}}, "not a density"),
])
def test_a_wrong_policy_file_is_refused_with_the_reason(tmp_path, change, message):
    path = _write(tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(UserError, match=message):
        dp.load(path, GPU, CC)


def test_a_corrupt_policy_file_is_refused(tmp_path):
    path = _write(tmp_path)
    path.write_text(path.read_text()[:40])
    with pytest.raises(UserError, match="unreadable"):
        dp.load(path, GPU, CC)


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: CC)


def test_for_device_uses_the_gpus_file_or_says_how_to_measure(tmp_path, fake_gpu):
    policy, note = dp.for_device(None, str(tmp_path / "absent"))
    assert policy is DEFAULT_POLICY and "H100 defaults" in note and "bench --suite policy" in note
    assert not (tmp_path / "absent").exists()  # reading the rule creates nothing (a read-only home still loads)
    path = _write(tmp_path, kernels_sha256=dp.kernels_digest())
    policy, note = dp.for_device(None, str(tmp_path))
    assert policy.max_density == 0.009 and str(path) in note and "0.90%" in note and "other kernel" not in note
    _write(tmp_path, kernels_sha256=dp.kernels_digest(), environment={"shape": {"d_model": 4096, "d_ffn": 14336}})
    assert "D 4096 × H 14336" in dp.for_device(None, str(tmp_path))[1]  # the shape it was measured at
    note = dp.for_device(None, str(tmp_path), shapes={(4096, 14336)})[1]
    assert "crossover may differ" not in note  # the model's own shape: nothing to add
    note = dp.for_device(None, str(tmp_path), shapes={(4096, 14336), (2048, 5632)})[1]
    assert "this model's layers are D 2048 × H 5632, where the crossover may differ" in note
    assert "--suite policy d_model=2048 d_ffn=5632" in note
    _write(tmp_path, kernels_sha256="0" * 64)  # measured before the kernels changed: used, and the note says so
    policy, note = dp.for_device(None, str(tmp_path))
    assert policy.max_density == 0.009 and "measured with other kernel sources" in note


def test_packed_layers_take_the_gpus_rule(tmp_path, fake_gpu, monkeypatch):
    from sparsify_cli import kernels
    from sparsify_cli.bench.model import sparse_under_graph
    from sparsify_cli.pack.packed import PackedFFN, use_backend

    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path))
    h, d = 128, 64
    w = {"gate_w": torch.randn(h, d), "up_w": torch.randn(h, d), "down_t": torch.randn(h, d)}
    layout = {"tile": 256, "compression": 8, "stats": {"mean_active": 2.0}}  # 1.6% of H active
    ffns = [PackedFFN(0, True, w, layout), PackedFFN(1, True, w, layout)]
    assert use_backend(ffns, "torch", "cpu") is None and all(f.policy is DEFAULT_POLICY for f in ffns)
    # H100 defaults: 1.6% is under the fused decode limit (6%) and the decode one (3%): sparse under a graph
    assert use_backend(ffns, "cuda", "cpu").startswith("dense/sparse rule: the H100 defaults")
    assert sparse_under_graph(ffns[0], 1) and sparse_under_graph(ffns[0], 64)
    _write(tmp_path, limits={"max_density": 0.0, "decode_max_density": 0.01, "fused_decode_max_density": 0.0})
    note = use_backend(ffns, "cuda", "cpu")
    assert "measured on this" in note and all(f.policy.decode_max_density == 0.01 for f in ffns)
    assert not sparse_under_graph(ffns[0], 1) and not sparse_under_graph(ffns[0], 64)  # this GPU: dense
    # a rule measured at another shape than the layers' (D 64, H 128 before pruning) still applies; the note says so
    assert PackedFFN(0, True, w, {**layout, "d_ffn_source": 160}).source_shape == (64, 160)
    _write(tmp_path, limits={"max_density": 0.0, "decode_max_density": 0.01, "fused_decode_max_density": 0.0},
           environment={"shape": {"d_model": 2048, "d_ffn": 5632}})
    note = use_backend(ffns, "cuda", "cpu")
    assert "this model's layers are D 64 × H 128" in note and ffns[0].policy.decode_max_density == 0.01
    seen = {}
    monkeypatch.setattr(kernels, "ffn_forward", lambda x, *a, **kw: seen.update(kw) or x)
    ffns[0]._cuda_forward(torch.randn(3, d))
    assert seen["policy"] is ffns[0].policy and seen["nnz_hint"] == 2.0


def test_policy_suite_finish_writes_the_rule_of_what_it_measured(tmp_path, fake_gpu, monkeypatch):
    from sparsify_cli.bench import policy as bp
    from sparsify_cli.bench import report

    monkeypatch.setattr(report, "environment", lambda device: {"date_utc": "2026-12-04T00:00:00Z"})
    s = bs.resolve("policy", "cuda", ["shapes=quick"])
    suite = bp.PolicySuite(s, cache_dir=str(tmp_path))
    for d, ms in ((0.004, 0.5), (0.007, 0.9), (0.01, 1.1)):
        suite.rows.append({"policy_kind": "prefill", "M": 4096, "nnz_mean": d * 5632, "density": d,
                           "dense_ms": 1.0, "sparse_ms": ms})
    fields = suite.finish()
    assert fields["policy"]["limits"] == {"max_density": 0.007, "decode_max_density": DEFAULT_POLICY.decode_max_density,
                                          "fused_decode_max_density": DEFAULT_POLICY.fused_decode_max_density}
    assert fields["policy"]["measured"] == ["prefill"] and "prefill: 0.70%" in fields["notes"][0]
    policy, doc = dp.load(dp.policy_path(GPU, CC, str(tmp_path)), GPU, CC)
    assert policy.max_density == 0.007 and doc["environment"]["shape"] == {"d_model": 2048, "d_ffn": 5632}
    assert len(fields["notes"]) == 1 and "at D 2048 × H 5632" in fields["notes"][0]  # nothing replaced
    # measuring again at another (toy) shape replaces this rule: the notes say so
    toy = bp.PolicySuite(bs.resolve("policy", "cuda", ["shapes=quick", "d_model=256", "d_ffn=1024"]),
                         cache_dir=str(tmp_path))
    toy.rows = [dict(r, nnz_mean=r["density"] * 1024) for r in suite.rows]
    notes = toy.finish()["notes"]
    assert "replaced the rule measured at D 2048 × H 5632" in notes[1]
    again = bp.PolicySuite(toy.s, cache_dir=str(tmp_path))
    again.rows = toy.rows
    assert len(again.finish()["notes"]) == 1  # same shape again: nothing to warn about


def test_policy_suite_points_follow_the_routing():
    from sparsify_cli.bench import policy as bp
    from sparsify_cli.kernels.launchers import FUSED_MAX_M

    s = bs.resolve("policy", "cuda", ["tokens=4096", "nnz=29", f"decode={FUSED_MAX_M},{FUSED_MAX_M + 1}"])
    kinds = {(k, m) for k, m, _ in bp.points(s)}
    assert kinds == {("prefill", 4096), ("fused_decode", FUSED_MAX_M), ("decode", FUSED_MAX_M + 1)}
    assert len(bp.points(s)) == 1 + 2 * len(bp.DECODE_DENSITIES)


@pytest.mark.parametrize("words, message", [
    (["tokens=64"], "prefill sizes"),
    (["decode=65"], "decode sizes"),
    (["d_model=100"], "multiple of 64"),
    (["layers=2"], "does not apply to the policy suite"),
])
def test_policy_suite_settings_are_checked_before_any_work(words, message):
    with pytest.raises(UserError, match=message):
        bs.resolve("policy", "cuda", words)


def test_policy_suite_needs_a_gpu():
    r = CliRunner().invoke(app, ["bench", "--suite", "policy", "--device", "cpu"])
    assert r.exit_code == 2 and "times the CUDA kernels" in r.output
