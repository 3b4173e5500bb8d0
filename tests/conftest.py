"""Shared fixtures. Tokenizers and token caches go to one cache for the whole session (SPARSIFY_CACHE), so the
default corpus is tokenized once per machine, not once per test."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("SPARSIFY_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "sparsify"))
os.environ.setdefault("WANDB_SILENT", "true")

_WORDS = (
    "the king queen lord lady sword crown night day love death heart blood fair foul good ill speak hear "
    "come go thou thee art hath doth shall will not and but or if when where why how what who this that"
).split()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A directory of small deterministic text documents (fast to tokenize) for loop and CLI tests."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(12):
        lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 14))) + "." for _ in range(120)]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines))
    return root


@pytest.fixture
def small_overrides(small_corpus, tmp_path) -> list[str]:
    """Overrides that make the tiny recipe run in a second or two on the small corpus."""
    return [
        f"data.path={small_corpus}",
        "data.vocab_size=300",
        f"data.cache_dir={tmp_path / 'cache'}",
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.d_ffn=64",
        "train.batch_size=4",
        "train.seq_len=32",
        "train.max_steps=6",
        "train.log_every=2",
        "train.eval_batches=2",
        "logger.wandb.mode=disabled",
        "logger.progress=false",
        "optim.warmup_steps=2",
        "sparsity.l1_warmup_steps=2",
    ]
