"""Token arrays on disk: the corpus tokenized once, then memory-mapped by every later run.

Layout: <cache>/tokens/<corpus fingerprint>-<tokenizer hash>/{train.bin, heldout.bin, meta.json}. The .bin files
are raw little-endian token ids (uint16 when the vocabulary fits, else uint32), each document followed by the EOS
id. meta.json is written last and lists each array's dtype and length: a directory without it, or whose files
do not have the sizes it states, is rebuilt rather than trusted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
from tokenizers import Tokenizer

from sparsify_cli.data.cache import write_atomic, write_text_atomic
from sparsify_cli.data.corpus import Corpus, Progress

SPLITS = ("train", "heldout")
# Documents per encode_batch call: enough to keep every core busy, few enough that the Encoding objects
# (far larger than the ids) of one batch stay small.
ENCODE_CHARS = 4_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size < 2**16 else np.dtype("<u4")


def load_or_build(
    corpus: Corpus, tokenizer: Tokenizer, eos: int, key: str, cache: Path, progress: Progress = None
) -> dict[str, np.ndarray]:
    """{"train": ids, "heldout": ids}, memory-mapped from the cache; tokenized and stored first if missing."""
    folder = cache / "tokens" / key
    arrays = _load(folder, key)
    if arrays is not None:
        return arrays
    dtype = token_dtype(tokenizer.get_vocab_size(with_added_tokens=True))
    meta = {"fingerprint": key, "dtype": dtype.str, "splits": {}}
    for split, docs in zip(SPLITS, (corpus.train_docs, corpus.heldout_docs)):
        if progress:
            progress(f"tokenizing the {split} split ({len(docs)} documents)…")
        start = time.perf_counter()
        ids = tokenize(docs, tokenizer, eos, dtype)
        write_atomic(folder / f"{split}.bin", ids.tofile)
        meta["splits"][split] = {"length": int(ids.size), "documents": len(docs)}
        if progress:
            progress(f"{split}: {ids.size:,} tokens in {time.perf_counter() - start:.1f} s")
    write_text_atomic(folder / "meta.json", json.dumps(meta, indent=1))  # last: it vouches for the .bin files
    arrays = _load(folder, key)
    if arrays is None:
        raise RuntimeError(f"token cache {folder} did not read back after writing it")
    return arrays


def tokenize(docs: list[str], tokenizer: Tokenizer, eos: int, dtype: np.dtype) -> np.ndarray:
    """All documents' ids in order, each followed by `eos`, as one 1-D array."""
    pieces = []
    for batch in _batches(docs):
        for encoding in tokenizer.encode_batch_fast(batch, add_special_tokens=False):
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
            pieces.append(np.array([eos], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


def _batches(docs: list[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= ENCODE_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _load(folder: Path, key: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when any part is missing or does not match meta.json."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        lengths = {split: int(meta["splits"][split]["length"]) for split in SPLITS}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if meta.get("fingerprint") != key:
        return None
    for split in SPLITS:
        file = folder / f"{split}.bin"
        if not file.is_file() or file.stat().st_size != lengths[split] * dtype.itemsize or lengths[split] == 0:
            return None
    return {split: np.memmap(folder / f"{split}.bin", dtype=dtype, mode="r", shape=(lengths[split],))
            for split in SPLITS}
