"""prepare_data: from a DataConfig to a tokenizer and memory-mapped train/held-out token arrays."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
from tokenizers import Tokenizer

from sparsify_cli.config.schema import DataConfig
from sparsify_cli.data.cache import cache_root
from sparsify_cli.data.corpus import Progress, load_corpus
from sparsify_cli.data.token_cache import load_or_build
from sparsify_cli.data.tokenizer import get_tokenizer, tokenizer_hash


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_tokens: np.ndarray  # (N_train,) uint16 (vocab < 65536) or uint32, memory-mapped from the cache
    heldout_tokens: np.ndarray  # (N_heldout,) same dtype
    vocab_size: int  # including the special tokens
    eos_id: int  # the document separator
    fingerprint: str  # id of (corpus contents, tokenizer): checkpoints record it to catch a resume on other data
    description: str  # one line for logs


def prepare_data(cfg: DataConfig, tokenizer_path: Optional[str] = None, progress: Progress = None) -> PreparedData:
    """Read the corpus, get its tokenizer, and tokenize it once (later runs reuse the cache).

    tokenizer_path (e.g. the tokenizer.json of a checkpoint being resumed) takes precedence over
    cfg.tokenizer_path; with neither, a byte-level BPE of cfg.vocab_size is trained on the train split.
    """
    corpus = load_corpus(cfg, progress)
    cache = cache_root(cfg.cache_dir)
    path = tokenizer_path if tokenizer_path is not None else cfg.tokenizer_path
    tokenizer, eos = get_tokenizer(corpus, cfg.vocab_size, cache, path, progress)
    fingerprint = hashlib.sha256(f"{corpus.fingerprint}:{tokenizer_hash(tokenizer)}".encode()).hexdigest()[:16]
    arrays = load_or_build(corpus, tokenizer, eos, fingerprint, cache, progress)
    train, heldout = arrays["train"], arrays["heldout"]
    return PreparedData(
        tokenizer=tokenizer,
        train_tokens=train,
        heldout_tokens=heldout,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        eos_id=eos,
        fingerprint=fingerprint,
        description=f"{corpus.name}, {_count(len(train))} train / {_count(len(heldout))} held-out tokens",
    )


def _count(n: int) -> str:
    """Three significant digits: 2640395 -> "2.64M", 138041 -> "138k", 8012 -> "8.01k", 512 -> "512"."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= 0.9995 * scale:  # 999_999 is "1M", not "1e+03k"
            return f"{n / scale:.3g}{suffix}"
    return str(n)
