"""The user's own text: .txt, .jsonl, directories, the held-out split, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparsify_cli.config.schema import DataConfig
from sparsify_cli.data import prepare_data
from sparsify_cli.data.corpus import load_corpus
from sparsify_cli.errors import UserError


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def corpus_of(path: Path, **kwargs):
    return load_corpus(DataConfig(path=str(path), **kwargs))


def test_txt_file_is_one_document_split_by_characters(tmp_path):
    text = "".join(f"line {i} of a single document\n" for i in range(100))
    (tmp_path / "one.txt").write_text(text)
    corpus = corpus_of(tmp_path / "one.txt", heldout_fraction=0.1)
    [train], [heldout] = corpus.train_docs, corpus.heldout_docs
    assert train + heldout == text
    assert len(heldout) == round(len(text) * 0.1)


def test_jsonl_documents_in_order_last_ones_held_out(tmp_path):
    records = [{"id": i, "body": f"document number {i}"} for i in range(20)]
    corpus = corpus_of(write_jsonl(tmp_path / "docs.jsonl", records), text_key="body", heldout_fraction=0.1)
    assert corpus.train_docs == [f"document number {i}" for i in range(18)]
    assert corpus.heldout_docs == ["document number 18", "document number 19"]


def test_blank_jsonl_lines_are_skipped(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n\n', encoding="utf-8")
    corpus = corpus_of(path)
    assert corpus.train_docs == ["a"] and corpus.heldout_docs == ["b"]


def test_two_documents_hold_one_out_even_at_a_tiny_fraction(tmp_path):
    corpus = corpus_of(write_jsonl(tmp_path / "d.jsonl", [{"text": "first"}, {"text": "second"}]),
                       heldout_fraction=0.001)
    assert corpus.train_docs == ["first"] and corpus.heldout_docs == ["second"]


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.txt").write_text("a/z")
    (tmp_path / "b.txt").write_text("b")
    write_jsonl(tmp_path / "a" / "m.jsonl", [{"text": "a/m 1"}, {"text": "a/m 2"}])
    (tmp_path / "c.txt").write_text("c")
    (tmp_path / "notes.md").write_text("not a corpus file")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.txt").write_text("hidden")
    corpus = corpus_of(tmp_path, heldout_fraction=0.2)
    assert corpus.train_docs == ["a/m 1", "a/m 2", "a/z", "b"]
    assert corpus.heldout_docs == ["c"]
    assert "4 files, 5 documents, 1 held out" in corpus.name


def test_fingerprint_follows_the_text_not_the_file_names(tmp_path):
    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    for name in ("x", "y"):
        (tmp_path / name / f"{name}1.txt").write_text("same text")
        (tmp_path / name / f"{name}2.txt").write_text("other text")
    assert corpus_of(tmp_path / "x").fingerprint == corpus_of(tmp_path / "y").fingerprint
    (tmp_path / "y" / "y2.txt").write_text("other text!")
    assert corpus_of(tmp_path / "x").fingerprint != corpus_of(tmp_path / "y").fingerprint


def test_prepare_user_directory_end_to_end(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(10):
        (docs / f"{i:02d}.txt").write_text(f"Document {i}. " + "the quick brown fox jumps over the lazy dog " * 20)
    data = prepare_data(DataConfig(path=str(docs), vocab_size=300, cache_dir=str(tmp_path / "cache")))
    # A text this small runs out of pairs seen twice before 300, so the vocabulary may stop short.
    assert 257 < data.vocab_size <= 300 and data.vocab_size == data.tokenizer.get_vocab_size()
    assert data.train_tokens.dtype == np.uint16
    assert int((data.train_tokens == data.eos_id).sum()) == 9
    assert int((data.heldout_tokens == data.eos_id).sum()) == 1
    assert data.tokenizer.decode(data.heldout_tokens[:-1].tolist()).startswith("Document 9. the quick")
    assert data.description.startswith(f"{docs} (10 files, 10 documents, 1 held out), ")


# ---- bad input: each is a UserError with a one-line message naming the file and what would be valid ----


def bad_jsonl_line(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    return path


def unsupported(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    return path


def missing_key(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "k.jsonl", [{"text": "ok"}, {"body": "no text key", "id": 1}])


def not_an_object(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "o.jsonl", [{"text": "ok"}, ["a", "list"]])


def not_a_string(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "s.jsonl", [{"text": 42}])


def empty_txt(tmp_path: Path) -> Path:
    (tmp_path / "empty.txt").write_text("")
    return tmp_path / "empty.txt"


def empty_jsonl(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "  \n "}])


def not_utf8(tmp_path: Path) -> Path:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    return tmp_path / "latin1.txt"


def no_corpus_files(tmp_path: Path) -> Path:
    (tmp_path / "readme.md").write_text("# nothing to train on")
    return tmp_path


def one_character(tmp_path: Path) -> Path:
    (tmp_path / "tiny.txt").write_text("x")
    return tmp_path / "tiny.txt"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "nowhere", r"nowhere'? does not exist; give a \.txt or \.jsonl file"),
        (unsupported, r"data\.csv'? has an unsupported extension; use \.txt or \.jsonl"),
        (bad_jsonl_line, r"bad\.jsonl:3: not valid JSON"),
        (missing_key, r"k\.jsonl:2: no 'text' field \(keys: 'body', 'id'\); set data\.text_key"),
        (not_an_object, r"o\.jsonl:2: a JSON list, not an object"),
        (not_a_string, r"s\.jsonl:1: field 'text' is a int, not a string"),
        (empty_txt, r"holds no text"),
        (empty_jsonl, r"holds no text"),
        (not_utf8, r"latin1\.txt: not valid UTF-8"),
        (no_corpus_files, r"is a directory without any \.txt or \.jsonl files"),
        (one_character, r"too short to hold any out"),
    ],
)
def test_bad_input_is_a_one_line_user_error(tmp_path, make, expected):
    with pytest.raises(UserError, match=expected) as info:
        corpus_of(make(tmp_path))
    assert "\n" not in str(info.value)


def test_unreadable_file(tmp_path, monkeypatch):
    # Permissions do not stop root (which CI may be), so the read itself is made to fail.
    path = tmp_path / "locked.txt"
    path.write_text("secret")

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)
    with pytest.raises(UserError, match=r"cannot read .*locked\.txt: Permission denied"):
        corpus_of(path)
