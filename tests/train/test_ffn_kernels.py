"""train.kernels (train/ffn_kernels.py): resolving it for a run, the per-layer dense/sparse policy, and a training
run whose layers switch to the sparse op (the pure-torch reference standing in for the CUDA one) as they get
sparse, against the same run kept dense."""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from rich.console import Console

from sparsify_cli.config.compose import compose
from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.errors import UserError
from sparsify_cli.kernels import train_reference
from sparsify_cli.model import SparseLlama
from sparsify_cli.sparsity import SparsityTracker
from sparsify_cli.train import ffn_kernels
from sparsify_cli.train.ffn_kernels import (
    DENSE_HYSTERESIS, ELL_WIDTH_MAX, ELL_WIDTH_MIN, SPARSE_CROSSOVER, LayerKernel, SparseLayerPolicy, ell_width,
    resolve_train_kernels,
)
from sparsify_cli.train.loop import Trainer

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def machine(monkeypatch):
    """Pretend the machine is what a test says: visible GPU or not, the kernels' status, a registered CUDA op."""

    def set_(gpu: bool = True, status: tuple[bool, str] = (True, "ok: test GPU"), op: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(ffn_kernels, "cuda_kernels_status", lambda: status)
        monkeypatch.setitem(train_reference.TRAIN_BACKENDS, "cuda", train_reference.TRAIN_BACKENDS["torch"])
        if not op:  # a backend name nothing registers
            monkeypatch.setattr(ffn_kernels, "SPARSE_BACKEND", "no_such_op")

    return set_


# ---- resolving train.kernels ---------------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["auto", "cuda"])
@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_cuda_where_it_can_run(machine, requested, precision):
    machine()
    k = resolve_train_kernels(requested, GPU, precision, "relu")
    assert (k.requested, k.resolved, k.reason) == (requested, "cuda", "")
    assert "sparse CUDA training op" in k.note


NO_GPU = "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"


@pytest.mark.parametrize("setup,device,precision,activation,reason", [
    (dict(gpu=False, status=(False, NO_GPU)), CPU, "auto", "relu", "no CUDA GPU is visible"),
    (dict(), CPU, "auto", "relu", "train.device=cpu"),
    (dict(), GPU, "fp32", "relu", "train.precision=fp32"),
    (dict(), GPU, "auto", "silu", "model.activation=silu"),
    (dict(gpu=False, status=(False, NO_GPU)), CPU, "fp32", "silu", "model.activation=silu"),  # config first
    (dict(status=(False, "GPU compute capability 7.5 is older than the 8.0 the kernels need")), GPU, "auto", "relu",
     "compute capability 7.5"),
    (dict(status=(False, "CuPy is not installed (No module named 'cupy')")), GPU, "bf16", "relu",
     "CuPy is not installed"),
    (dict(op=False), GPU, "auto", "relu", "the CUDA training op does not load (ValueError: "),
])
def test_cuda_fails_with_the_reason_and_auto_falls_back(machine, setup, device, precision, activation, reason):
    machine(**setup)
    with pytest.raises(UserError, match="train.kernels=cuda cannot run: .*" + re.escape(reason)) as err:
        resolve_train_kernels("cuda", device, precision, activation)
    assert "\n" not in str(err.value)
    k = resolve_train_kernels("auto", device, precision, activation)
    assert k.resolved == "torch" and reason in k.reason
    assert k.note.startswith("train.kernels=auto: dense torch FFNs") and reason in k.note


def test_too_small_for_sparse():
    assert ffn_kernels.too_small_for_sparse(16384, 2048, 5632) is None  # the paper-shaped layer measured at 1.22x
    why = ffn_kernels.too_small_for_sparse(2048, 128, 512)  # the tiny recipe: measured at 0.5-0.6x
    assert why and "too small" in why and "2048 tokens" in why and "\n" not in why
    assert ffn_kernels.too_small_for_sparse(4096, 2048, 5632)  # the paper shape at 4096 tokens: measured 0.89x


def test_fit_to_size_keeps_auto_dense_for_small_ffns_and_warns_for_cuda():
    auto, cuda = ffn_kernels.TrainKernels("auto", "cuda"), ffn_kernels.TrainKernels("cuda", "cuda")
    assert ffn_kernels.fit_to_size(auto, 16384, 2048, 5632) == (auto, "")
    fitted, note = ffn_kernels.fit_to_size(auto, 2048, 128, 512)
    assert fitted.resolved == "torch" and "too small" in fitted.reason and note == fitted.note
    kept, note = ffn_kernels.fit_to_size(cuda, 2048, 128, 512)
    assert kept is cuda and note.startswith("train.kernels=cuda: running the sparse op as asked, but")
    torch_run = ffn_kernels.TrainKernels("torch", "torch")
    assert ffn_kernels.fit_to_size(torch_run, 1, 1, 1) == (torch_run, "")


def test_torch_is_torch_without_asking(monkeypatch):
    def ask():
        raise AssertionError("kernels=torch must not look for the CUDA kernels")

    monkeypatch.setattr(ffn_kernels, "cuda_kernels_status", ask)
    k = resolve_train_kernels("torch", GPU, "bf16", "silu")
    assert k.resolved == "torch" and k.note == ""


def test_config_accepts_cuda_and_names_the_choices(small_overrides):
    assert compose("tiny", small_overrides + ["train.kernels=cuda"]).train.kernels == "cuda"
    with pytest.raises(UserError, match="choose one of: auto, torch, cuda"):
        compose("tiny", small_overrides + ["train.kernels=triton"])


def test_trainer_refuses_cuda_before_any_work(small_overrides, tmp_path):
    """Anywhere (CPU machine or GPU machine): train.device=cpu cannot run the CUDA op. Nothing is prepared."""
    with pytest.raises(UserError, match="train.kernels=cuda cannot run"):
        Trainer(compose("tiny", small_overrides + ["train.kernels=cuda", "train.device=cpu"]), tmp_path / "run")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_trainer_on_cpu_says_once_why_auto_is_torch(small_overrides, tmp_path):
    out = io.StringIO()
    t = Trainer(compose("tiny", small_overrides + ["train.device=cpu"]), tmp_path / "run",
                console=Console(file=out, width=200))
    assert t.kernels.resolved == "torch" and t.ffn_policy is None
    assert out.getvalue().count("train.kernels=auto: dense torch FFNs") == 1
    assert "kernels/sparse_layers" not in t.train_step()
    assert not any(ffn.sparse_train for ffn in t.model.ffns)


# ---- the per-layer policy ------------------------------------------------------------------------------------


def test_policy_thresholds_and_hysteresis():
    h = 1000
    enter, leave = SPARSE_CROSSOVER * h, SPARSE_CROSSOVER * DENSE_HYSTERESIS * h
    assert DENSE_HYSTERESIS > 1 and enter < leave
    p = SparseLayerPolicy(4, h)
    assert [c.sparse for c in p.decide([enter, enter + 0.01, 0.0, math.nan])] == [True, False, True, False]
    # Between the two thresholds a layer keeps its path: layer 0 stays sparse, layer 1 stays dense.
    mid = (enter + leave) / 2
    assert [c.sparse for c in p.decide([mid, mid, leave, leave])] == [True, False, True, False]
    assert [c.sparse for c in p.decide([leave + 0.01, enter, leave, enter])] == [False, True, True, True]
    # Back below: dense layers go sparse only at or below the crossover again.
    assert [c.sparse for c in p.decide([mid, mid, mid, math.nan])] == [False, True, True, False]


def test_no_statistics_means_dense():
    p = SparseLayerPolicy(3, 64)
    assert p.decide(None) == [LayerKernel(False)] * 3
    p.decide([0.0, 0.0, 0.0])
    assert all(c.sparse for c in p.layers)
    assert p.decide(None) == [LayerKernel(False)] * 3  # e.g. the tracker saw no token since the last step
    with pytest.raises(ValueError, match="2 statistics for 3 layers"):
        p.decide([0.0, 0.0])


def test_ell_width():
    assert ell_width(0.0) == ell_width(10.0) == ELL_WIDTH_MIN == 64
    assert ell_width(30.0) == 96 and ell_width(32.0) == 96 and ell_width(32.5) == 128
    assert ell_width(112.6) == 352  # the default crossover at the paper's H = 5632: 338 rounded up
    assert ell_width(1e6) == ELL_WIDTH_MAX == 512
    for m in (0.3, 7.0, 21.4, 50.0, 99.9, 170.0, 1000.0):
        w = ell_width(m)
        assert w % 32 == 0 and ELL_WIDTH_MIN <= w <= ELL_WIDTH_MAX and (w >= 3 * m or w == ELL_WIDTH_MAX)
    p = SparseLayerPolicy(2, 5632)
    assert p.decide([40.0, 5000.0]) == [LayerKernel(True, 128), LayerKernel(False)]


def test_policy_is_a_function_of_the_statistics():
    """The same statistics (every rank sees the same reduced numbers) give the same decisions."""
    g = torch.Generator().manual_seed(0)
    history = [None] + [(torch.rand(6, generator=g) * 3).tolist() for _ in range(30)]
    a, b = SparseLayerPolicy(6, 100, crossover=0.015), SparseLayerPolicy(6, 100, crossover=0.015)
    decided = [(a.decide(m), b.decide(m)) for m in history]
    assert all(x == y for x, y in decided)
    assert len({tuple(c.sparse for c in x) for x, _ in decided}) > 3  # the history did move the layers around


def test_apply_sets_the_model_flags():
    torch.manual_seed(0)
    model = SparseLlama(ModelConfig(d_model=32, n_layers=3, n_heads=4, d_ffn=64, vocab_size=50, max_seq_len=16))
    p = SparseLayerPolicy(3, 64, backend="torch", crossover=0.5)
    assert p.step(model.ffns, [10.0, 32.0, 33.0]) == 2  # sparse at or below 0.5 · 64 = 32
    assert [f.sparse_train for f in model.ffns] == [True, True, False]
    assert [f.sparse_width for f in model.ffns][0] == 64 and model.ffns[0].sparse_backend == "torch"
    assert p.step(model.ffns, None) == 0 and not any(f.sparse_train for f in model.ffns)


def test_tracker_step_mean_active_is_the_previous_steps_mean():
    tr = SparsityTracker(2, 8, dead_window_tokens=100)
    assert tr.step_mean_active() is None
    h0 = torch.tensor([[1.0, 0, 0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]])  # 2 tokens: 2 and 0 active
    h1 = torch.ones(3, 8)
    tr.begin_forward(want_l1=False)
    tr(0, h0)
    tr(1, h0)
    tr.end_forward()
    tr.begin_forward(want_l1=False)
    tr(0, h1)  # a second micro-batch of the same step: 3 tokens, all 8 active
    tr.observe_sparse(1, torch.zeros(()), torch.tensor([8, 8, 8]), torch.full((8,), 3))
    tr.end_forward()
    assert tr.step_mean_active() == [pytest.approx(26 / 5), pytest.approx(26 / 5)]
    assert tr.layer_stats()[0].mean_active == pytest.approx(26 / 5)  # what the log reads, over the same tokens
    assert tr.step_mean_active() is None  # restarted
    tr(0, h1)  # not collecting (e.g. a recomputation under activation checkpointing): not counted
    assert tr.step_mean_active() is None


# ---- end to end on the CPU -----------------------------------------------------------------------------------


def test_layers_switch_to_sparse_once_sparse_enough_and_train_like_dense(small_overrides, tmp_path, monkeypatch):
    """The policy with the pure-torch sparse op ("torch", exact) on CPU: layers start dense (no statistics), go
    sparse once their mean active count at the previous step drops under the crossover, the flags change only
    between optimizer steps, and the losses are those of the dense run (the same math, fp32 rounding apart)."""
    overrides = small_overrides + [
        "train.max_steps=10", "train.log_every=1", "train.grad_accum=2", "sparsity.l1_coeff=0.05",
        "sparsity.l1_warmup_steps=0",
    ]
    dense = Trainer(compose("tiny", overrides), tmp_path / "dense")
    dense.run()

    t = Trainer(compose("tiny", overrides), tmp_path / "sparse")
    crossover = 0.25  # of H = 64: sparse at <= 16 active, back to dense above 20 (this run falls from ~32 to ~2)
    t.ffn_policy = SparseLayerPolicy(2, 64, backend="torch_counted", crossover=crossover)
    calls: list[int] = []  # the optimizer step (1-based; 11 = the final evaluation) of every call of the sparse op
    ref = train_reference.TRAIN_BACKENDS["torch"]

    def counted(*a, **k):
        calls.append(t.step + 1)
        return ref(*a, **k)

    monkeypatch.setitem(train_reference.TRAIN_BACKENDS, "torch_counted", counted)
    seen = []  # the statistics each step's decision was made from
    step_mean_active = t.tracker.step_mean_active
    t.tracker.step_mean_active = lambda: seen.append(step_mean_active()) or seen[-1]
    t.run()

    metrics = [json.loads(line) for line in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "kernels/sparse_layers" in m]
    assert [m["step"] for m in steps] == list(range(1, 11)) and len(seen) == 10
    flags = [[m[f"layer{i}/ell_width"] > 0 for i in range(2)] for m in steps]
    assert seen[0] is None and flags[0] == [False, False]  # step 1: no statistics yet
    policy = SparseLayerPolicy(2, 64, crossover=crossover)  # replaying the statistics gives the same decisions
    for stats, fl in zip(seen, flags):
        assert [c.sparse for c in policy.decide(stats)] == fl
    for i in range(2):  # every layer started dense, switched, and ended sparse
        assert flags[1][i] is False and flags[-1][i] is True, [f[i] for f in flags]
    # The op ran exactly on the sparse layers, on both micro-batches of their step: flags never changed mid-step.
    # The final evaluation (2 batches) runs the layers as the last step left them (the same function).
    assert calls == [s for s, m in enumerate(steps, 1) for _ in range(2 * m["kernels/sparse_layers"])] + [11] * 4
    assert all(m[f"layer{i}/ell_width"] in (0, 64) for m in steps for i in range(2))  # 3 × ≤ 20 → the 64 minimum

    dense_lines = (tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()
    dense_ce = [m["ce"] for m in map(json.loads, dense_lines) if "ce" in m]
    sparse_ce = [m["ce"] for m in steps]
    assert sparse_ce == pytest.approx(dense_ce, rel=1e-4)
    for (name, p), q in zip(dense.model.named_parameters(), t.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
    config = json.loads((tmp_path / "sparse" / "checkpoint" / "config.json").read_text())
    assert config["train_kernels"] == "torch"  # what train.kernels resolved to here (the policy was injected)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch without gloo")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_data_parallel_ranks_decide_alike(small_overrides, tmp_path, parallel):
    """2 CPU processes: every rank sees the same (reduced) statistics and takes the same decisions, layers go
    sparse as in one process, and the losses are those of a one-process dense run."""
    overrides = small_overrides + [
        "train.max_steps=10", "train.log_every=1", "sparsity.l1_coeff=0.05", "sparsity.l1_warmup_steps=0",
    ]
    dense = Trainer(compose("tiny", overrides), tmp_path / "dense")
    dense.run()
    worker = Path(__file__).with_name("ffn_policy_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker),
           str(tmp_path / "two"), "0.25", *overrides, f"train.parallel={parallel}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / "two" / f"rank{i}.json").read_text()) for i in (0, 1))
    assert rank0 == rank1
    assert rank0["decided"][0] == [False, False] and rank0["decided"][-1] == [True, True]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    one = [json.loads(line) for line in (tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()]
    assert [m["ce"] for m in two if "ce" in m] == pytest.approx([m["ce"] for m in one if "ce" in m], rel=1e-4)
