"""Tiny checkpoints trained for a few steps on the small corpus, shared by all eval tests of a session."""

from __future__ import annotations

import pytest

from sparsify_cli.config.compose import compose
from sparsify_cli.train.loop import Trainer


def _overrides(corpus, cache, **extra) -> list[str]:
    base = {
        "data.path": str(corpus), "data.vocab_size": "300", "data.cache_dir": str(cache),
        "model.d_model": "32", "model.n_layers": "2", "model.n_heads": "2", "model.d_ffn": "96",
        "train.batch_size": "4", "train.seq_len": "32", "train.max_steps": "8", "train.log_every": "4",
        "train.eval_batches": "2", "logger.wandb.mode": "disabled", "logger.progress": "false",
        "optim.warmup_steps": "2", "sparsity.l1_warmup_steps": "2", "sparsity.l1_coeff": "0.02",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_tiny(run_dir, corpus, cache, **extra):
    """Train a tiny model into run_dir; return the TrainResult (held-out CE and sparsity of its final eval)."""
    return Trainer(compose("tiny", _overrides(corpus, cache, **extra)), run_dir).run()


@pytest.fixture(scope="session")
def tiny_runs(small_corpus, tmp_path_factory):
    """Two runs on the same data and tokenizer: λ = 0.02 ("sparse") and λ = 0 ("relu")."""
    root = tmp_path_factory.mktemp("eval_runs")
    cache = root / "cache"
    results = {
        "sparse": train_tiny(root / "sparse", small_corpus, cache),
        "relu": train_tiny(root / "relu", small_corpus, cache, **{"sparsity.l1_coeff": "0"}),
    }
    return {
        "sparse": root / "sparse",
        "relu": root / "relu",
        "results": results,
        "train": lambda run_dir, **extra: train_tiny(run_dir, small_corpus, cache, **extra),
        "cache": cache,
        "corpus": small_corpus,
        "root": root,
    }
