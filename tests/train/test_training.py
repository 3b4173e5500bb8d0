import json

import pytest
import torch

from sparsify_cli.config.compose import compose
from sparsify_cli.errors import UserError
from sparsify_cli.train import checkpoint as ckpt
from sparsify_cli.train.loop import Trainer, TrainingDiverged, take_peak_memory_gib
from sparsify_cli.train.optim import lr_at
from sparsify_cli.config.schema import OptimConfig


def run(overrides, run_dir, resume=False):
    trainer = Trainer(compose("tiny", overrides), run_dir, resume=resume)
    return trainer, trainer.run()


def test_short_run_lowers_the_loss_and_writes_a_checkpoint(small_overrides, tmp_path):
    overrides = small_overrides + ["train.max_steps=30", "optim.lr=1e-2"]
    trainer, result = run(overrides, tmp_path / "run")
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ces = [l["ce"] for l in lines if "ce" in l]
    assert ces[-1] < ces[0] - 0.5, ces
    assert "sparsity" in lines[0] and "tokens_per_s" in lines[0]
    assert {"layer0/active_mean", "layer1/active_max", "layer1/dead_fraction"} <= set(lines[0])
    assert "memory/peak_gib" not in lines[0]  # CUDA only
    assert result.heldout_ce < ces[0]
    model, config = ckpt.load_model(tmp_path / "run")
    assert config["model"]["d_ffn"] == 64 and config["format_version"] == ckpt.FORMAT_VERSION
    x = torch.randint(0, 300, (1, 8))
    assert torch.equal(model(x), trainer.model.cpu().eval()(x))


def test_resume_is_exact(small_overrides, tmp_path):
    """N steps straight == N/2 steps, resume, N/2 steps: bit-identical weights and optimizer state on CPU."""
    overrides = small_overrides + ["train.max_steps=6", "sparsity.reinit_dead=true", "sparsity.reinit_every=2",
                                   "sparsity.dead_window_tokens=64"]
    straight, _ = run(overrides, tmp_path / "a")
    run(small_overrides + ["train.max_steps=3"], tmp_path / "b")
    resumed, _ = run(overrides, tmp_path / "b", resume=True)
    assert resumed.step == straight.step == 6
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(straight.tracker.last_fired, resumed.tracker.last_fired)


def test_resume_refuses_a_changed_model_and_a_missing_checkpoint(small_overrides, tmp_path):
    run(small_overrides + ["train.max_steps=2"], tmp_path / "r")
    with pytest.raises(UserError, match="model.d_ffn"):
        Trainer(compose("tiny", small_overrides + ["model.d_ffn=128"]), tmp_path / "r", resume=True)
    with pytest.raises(UserError, match="no checkpoint"):
        Trainer(compose("tiny", small_overrides), tmp_path / "empty", resume=True)
    with pytest.raises(UserError, match="already holds a checkpoint"):
        Trainer(compose("tiny", small_overrides), tmp_path / "r")


def test_nan_loss_stops_with_step_and_layer(small_overrides, tmp_path):
    trainer = Trainer(compose("tiny", small_overrides), tmp_path / "nan")
    with torch.no_grad():
        trainer.model.blocks[1].ffn.up.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="step 1 .*layer 1"):
        trainer.run()
    assert not (tmp_path / "nan" / "checkpoint").exists()


def test_checkpoint_write_is_atomic(small_overrides, tmp_path, monkeypatch):
    trainer, _ = run(small_overrides + ["train.max_steps=2"], tmp_path / "c")
    before = (tmp_path / "c" / "checkpoint" / "model.safetensors").read_bytes()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(UserError, match="No space left on device; the previous one is intact"):
        trainer.save()
    assert (tmp_path / "c" / "checkpoint" / "model.safetensors").read_bytes() == before
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".checkpoint")] == []


def test_corrupt_and_foreign_checkpoints_are_refused(small_overrides, tmp_path):
    run(small_overrides + ["train.max_steps=1"], tmp_path / "k")
    weights = tmp_path / "k" / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="corrupt or unreadable"):
        ckpt.load_model(tmp_path / "k")
    with pytest.raises(UserError, match="not a sparsify checkpoint"):
        ckpt.load_model(tmp_path)
    cfg_path = tmp_path / "k" / "checkpoint" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="format version 99"):
        ckpt.load_model(tmp_path / "k")


def test_grad_accumulation_matches_one_big_batch(small_overrides, tmp_path):
    """Two micro-batches of 2 accumulate to the gradient of one batch of 4 (same sequences)."""
    base = small_overrides + ["train.max_steps=1", "optim.grad_clip=0"]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 300, (4, 33), generator=g)
    batch = (x[:, :-1], x[:, 1:])
    grads = {}
    for accum in (1, 2):
        t = Trainer(compose("tiny", base + [f"train.grad_accum={accum}"]), tmp_path / f"ga{accum}")
        t.sampler.next_batch = lambda: batch  # the step's global batch; the trainer cuts the micro-batches
        t.optimizer.step = lambda t=t, a=accum: grads.__setitem__(a, [p.grad.clone() for p in t.model.parameters()])
        t.train_step()
    for g1, g2 in zip(grads[1], grads[2]):
        assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-4)


def test_peak_memory_is_read_and_reset_per_log_window_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: calls.append(("peak", d)) or 3 * 2**29)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: calls.append(("reset", d)))
    assert take_peak_memory_gib(torch.device("cpu")) is None and calls == []
    cuda = torch.device("cuda", 1)
    assert take_peak_memory_gib(cuda) == 1.5
    assert calls == [("peak", cuda), ("reset", cuda)]


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, cfg) == pytest.approx(0.55)
    assert lr_at(100, 100, cfg) == pytest.approx(0.1)


def test_wandb_offline_writes_locally(small_overrides, tmp_path):
    pytest.importorskip("wandb")
    overrides = [o for o in small_overrides if not o.startswith("logger.wandb")] + ["train.max_steps=2"]
    run(overrides + ["logger.wandb.mode=offline"], tmp_path / "w")
    assert list((tmp_path / "w" / "wandb").glob("offline-run-*")), "no offline W&B run directory"


def test_wandb_online_without_key_falls_back_to_offline(tmp_path, monkeypatch):
    """No key: wandb would prompt on the terminal and wait; the sink logs offline instead and says so."""
    pytest.importorskip("wandb")
    from sparsify_cli.config.schema import WandbConfig
    from sparsify_cli.train.metrics import MetricsSink

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    said = []
    sink = MetricsSink(tmp_path, False, WandbConfig(mode="online"), "t", {}, warn=said.append)
    sink.close()
    assert any("no W&B API key" in s for s in said)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_activation_checkpointing_trains_like_without(small_overrides, tmp_path):
    """With the L1 term on: the recomputed forward must not break backward or count statistics twice."""
    base = small_overrides + ["train.max_steps=2"]
    plain, _ = run(base, tmp_path / "plain")
    ckpt_run, _ = run(base + ["train.activation_checkpointing=true"], tmp_path / "ckpt")
    for (name, p), q in zip(plain.model.named_parameters(), ckpt_run.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert plain.tracker.tokens_seen == ckpt_run.tracker.tokens_seen
    assert torch.equal(plain.tracker.last_fired, ckpt_run.tracker.last_fired)
