"""The model suite from a checkpoint and from a packed dir, and what makes its comparison honest."""

import json

import pytest
import torch
from typer.testing import CliRunner

from sparsify_cli.bench import model as bm
from sparsify_cli.bench import model_pair as mp
from sparsify_cli.bench.settings import resolve
from sparsify_cli.cli.app import app
from sparsify_cli.config.compose import compose
from sparsify_cli.pack import PackOptions, pack_checkpoint
from sparsify_cli.train.loop import Trainer


@pytest.fixture(scope="module")
def run_and_packed(tmp_path_factory, request):
    small_overrides = request.getfixturevalue("small_overrides_module")
    root = tmp_path_factory.mktemp("bench_model")
    Trainer(compose("tiny", small_overrides + ["train.max_steps=3"]), root / "run").run()
    pack_checkpoint(root / "run", root / "packed", PackOptions(calib_tokens=256),
                    [o for o in small_overrides if o.startswith("data.")])
    return root / "run", root / "packed"


@pytest.fixture(scope="module")
def small_overrides_module(small_corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("bench_cache")
    return [f"data.path={small_corpus}", "data.vocab_size=300", f"data.cache_dir={cache}", "model.d_model=32",
            "model.n_layers=2", "model.n_heads=2", "model.d_ffn=64", "train.batch_size=4", "train.seq_len=32",
            "train.log_every=2", "train.eval_batches=1", "logger.wandb.mode=disabled", "logger.progress=false",
            "sparsity.l1_coeff=0.02", "optim.warmup_steps=1"]


@pytest.mark.parametrize("which", ["run", "packed"])
def test_model_suite_from_a_checkpoint_or_packed_dir(run_and_packed, which, tmp_path):
    path = run_and_packed[0] if which == "run" else run_and_packed[1]
    out = tmp_path / "m.json"
    r = CliRunner().invoke(app, ["bench", str(path), "seq_len=32", "batch=2", "train_batch=2", "decode=1,4", "reps=2",
                                 "warmup=0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["model_source"] == ("checkpoint" if which == "run" else "packed")
    assert report["model_config"]["d_ffn"] == 64
    kinds = [(x["kind"], x["M"]) for x in report["rows"]]
    assert kinds == [("prefill", 64), ("decode", 1), ("decode", 4), ("train", 64)]
    for x in report["rows"][:3]:
        assert x["rel_err"] < 1e-4  # the packed model computes the dense model's function (fp32)


def test_dense_twin_of_a_packed_model_is_the_source(run_and_packed):
    from sparsify_cli.pack import load_packed
    from sparsify_cli.train.checkpoint import load_model

    run, packed = run_and_packed
    pk, manifest = load_packed(packed, kernels="torch")
    twin, source = mp.dense_twin(pk), load_model(run)[0].eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        assert torch.allclose(twin(x), pk(x), atol=1e-4)
        # pruned neurons never fired in calibration; the twin has them as zero rows, the source does not
        assert torch.allclose(twin(x), source(x), atol=5e-2)
    assert twin.ffns[0].up.weight.shape[0] == 64


def test_synthetic_model_hits_its_sparsity_and_the_sparse_model_reads_only_active_rows():
    s = resolve("model", "cpu", ["sparsity=0.97", "layers=2", "seq_len=32"])
    models = mp.load_models(s, None, torch.device("cpu"))
    tokens = mp.random_tokens(s.vocab, 4, 32, seed=123)
    stats, per_layer = mp.measure_nnz(models.dense, tokens)
    assert abs(stats["sparsity"] - 0.97) < 0.005 and len(per_layer) == 2
    decode, _ = mp.measure_nnz(models.dense, mp.random_tokens(s.vocab, 64, 1, seed=5))  # first positions alike
    assert abs(decode["sparsity"] - 0.97) < 0.007
    never = []  # poison the rows of neurons that fire on none of these tokens: the sparse model must not read them
    models.dense.set_observer(lambda i, h: never.append((h.reshape(-1, h.shape[-1]) == 0).all(0)))
    with torch.no_grad():
        ref = models.dense(tokens)
    models.dense.set_observer(None)
    for ffn, idle in zip(models.sparse.ffns, never):
        # the sparse twin is packed (dead neurons gone, hot-first order): map the idle source neurons to its rows
        assert ffn.width < idle.numel() and ffn.n_hot >= 0
        index = ffn.neuron_index
        idle = torch.where(index >= 0, idle[index.clamp(min=0)], torch.ones_like(index, dtype=torch.bool))
        assert idle.sum() > 50
        ffn.up_w[idle] = float("nan")
        ffn.down_t[idle] = float("nan")
    with torch.no_grad():
        y = models.sparse(tokens)
    assert torch.isfinite(y).all() and torch.allclose(y, ref, atol=1e-4)
    with torch.no_grad():
        assert torch.isnan(models.dense.ffns[0].up.weight).sum() == 0  # the dense model was not touched


def test_graphs_setting_and_the_cpu_skip():
    from sparsify_cli.errors import UserError

    assert resolve("model", "cpu", []).graphs is True and resolve("model", "cuda", []).graphs is True
    assert resolve("model", "cpu", ["graphs=false"]).graphs is False
    with pytest.raises(UserError, match="expected true or false"):
        resolve("model", "cpu", ["graphs=maybe"])
    with pytest.raises(UserError, match="does not apply to the cpu suite"):
        resolve("cpu", "cpu", ["graphs=false"])

    def labels(device, *overrides):  # cases() does not load the models
        suite = bm.ModelSuite(resolve("model", "cpu", ["decode=1,8", *overrides]), None, torch.device(device))
        return [label for label, _ in suite.cases()], suite.notes()

    cpu, notes = labels("cpu")
    assert cpu == ["prefill 4×64", "decode batch 1", "decode batch 8", "train step 4×64 (dense vs sparse)"]
    assert notes == ["decode (graphs): not run (CUDA graphs need a GPU (--device cuda)); the decode rows ran eagerly"]
    gpu, notes = labels("cuda")  # a device object only: nothing runs
    assert gpu[3:5] == ["decode batch 1 (CUDA graphs)", "decode batch 8 (CUDA graphs)"] and len(gpu) == 6
    assert notes == []
    off, notes = labels("cuda", "graphs=false")
    assert off == cpu and notes == ["decode (graphs): not run (graphs=false); the decode rows ran eagerly"]


def test_decode_graph_rows_with_stand_ins_for_cuda_graphs(monkeypatch):
    """The graph rows' code path on the CPU, torch.cuda's streams and graphs replaced by stand-ins ("capture" runs
    the step eagerly, replay() does nothing): the row's fields, and the warm-up's sparse mode, restored after it."""
    import contextlib

    from sparsify_cli.pack.packed import PackedFFN

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    class Graph:
        replays = 0

        def replay(self):
            Graph.replays += 1

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    modes = []
    forward = PackedFFN.forward
    monkeypatch.setattr(PackedFFN, "forward", lambda self, x: modes.append(self.mode) or forward(self, x))

    s = resolve("model", "cpu", ["decode=2", "reps=2", "warmup=0", "context=8", "sparsity=0.995"])
    suite = bm.ModelSuite(s, None, torch.device("cpu"))
    suite._ensure()  # the models (packing runs the sparse one)
    assert all(bm.sparse_under_graph(f, 2) for f in suite.models.sparse.ffns)  # 0.5% active: sparse at decode
    modes.clear()
    row = suite.decode_graphs(2)
    assert row["kind"] == "decode (graphs)" and row["M"] == 2 and row["context"] == 8
    assert row["rel_err"] < 1e-5 and row["replay_vs_eager_err"] == 0.0  # fp32, the torch path: the same function
    assert row["dense_ms"] > 0 and row["sparse_ms"] > 0 and row["speedup"] == pytest.approx(
        row["dense_ms"] / row["sparse_ms"])
    assert row["dense_peak_mb"] is None and row["sparse_peak_mb"] is None
    assert row["sparse_layers"] == 0 and "0/2 layers" in row["sparse_path"]  # the torch backend: no CUDA kernels
    assert "fixed position 8" in row["notes"] and "g.replay()" in row["notes"]
    assert Graph.replays >= 2 * 2  # both graphs timed
    # the sparse model: prefill, one warm-up step with mode=sparse, then warm-up and capture as the policy decides
    assert modes[:2] == ["auto", "auto"] and modes[2:4] == ["sparse", "sparse"] and set(modes[4:]) == {"auto"}
    assert all(f.mode == "auto" for f in suite.models.sparse.ffns)


def test_graph_decode_rule_uses_the_fused_limit_and_all_neurons():
    """A packed layer at 4% density: under a graph it decodes sparse at 1..8 tokens (the fused path, limit 6%)
    and dense at 64 (the unfused path, limit 2%). With hot-first neurons the decode rule counts them too: the
    cold-only hint is for the hybrid prefill."""
    from sparsify_cli.config.schema import ModelConfig
    from sparsify_cli.model import SparseLlama
    from sparsify_cli.pack.packed import PackedFFN

    torch.manual_seed(0)
    model = SparseLlama(ModelConfig(d_model=128, n_layers=1, n_heads=2, d_ffn=1000, vocab_size=50, max_seq_len=16))
    f = mp._packed_ffn(model, 0, 40.0)
    assert f.nnz_hint == 40.0 and f.cold_nnz_hint is None
    assert bm.sparse_under_graph(f, 1) and bm.sparse_under_graph(f, 8) and not bm.sparse_under_graph(f, 64)
    weights = {name: getattr(f, name) for name in ("gate_w", "up_w", "down_t", "neuron_index")}
    hot = PackedFFN(0, True, weights, {"tile": f.tile, "compression": 8, "n_hot": 64,
                                       "stats": {"mean_active": 80.0, "cold_mean_active": 10.0}})
    assert (hot.nnz_hint, hot.cold_nnz_hint) == (80.0, 10.0)
    assert not bm.sparse_under_graph(hot, 1)  # 8% of H over all neurons, though the cold ones are at 1%
