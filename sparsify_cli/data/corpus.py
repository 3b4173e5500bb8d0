"""A corpus: documents split into train and held-out, with a content fingerprint.

The fingerprint keys every cache (tokenizer, token arrays) and is recorded in checkpoints, so it covers the
text of every document and which split each one is in, nothing else (not file names or modification times):
the same text always maps to the same caches, wherever it lives.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

from sparsify_cli.config.schema import DataConfig

Progress = Optional[Callable[[str], None]]

# Bumped whenever the way documents are assembled changes, so caches built from older assemblies are not reused.
CORPUS_FORMAT = "corpus-v1"


@dataclass(frozen=True)
class Corpus:
    train_docs: list[str]
    heldout_docs: list[str]
    name: str  # for one-line descriptions, e.g. "default corpus: 37 plays + 5 poems + KJV"

    @cached_property  # hashing the default corpus takes ~20 ms; prepare_data asks more than once
    def fingerprint(self) -> str:
        """sha256 of the text of every document, split by split (16 hex digits are plenty for a cache key)."""
        h = hashlib.sha256(CORPUS_FORMAT.encode())
        for split in (self.train_docs, self.heldout_docs):
            h.update(len(split).to_bytes(8, "little"))
            for doc in split:
                data = doc.encode("utf-8")
                # The length prefix keeps ["ab", "c"] and ["a", "bc"] apart.
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()[:16]


def load_corpus(cfg: DataConfig, progress: Progress = None) -> Corpus:
    """The embedded default corpus when cfg.path is unset, else the user's files."""
    # Imported here so that each source's module loads only when used.
    if cfg.path is None:
        from sparsify_cli.data.default_corpus import load_default_corpus

        return load_default_corpus(progress)
    from sparsify_cli.data.user_corpus import load_user_corpus

    return load_user_corpus(cfg.path, cfg.text_key, cfg.heldout_fraction, progress)
