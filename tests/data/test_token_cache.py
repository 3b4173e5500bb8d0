"""The token cache: where it lives, and that a damaged or half-written entry is rebuilt, never trusted."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsify_cli.config.schema import DataConfig
from sparsify_cli.data import prepare_data
from sparsify_cli.data.cache import write_atomic


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(f"Text number {i}: " + "to be or not to be, that is the question. " * 30)
    return folder


def entry(cache):
    [folder] = (cache / "tokens").iterdir()
    return folder


@pytest.mark.parametrize("damage", ["truncate train", "drop meta", "garble meta", "wrong fingerprint"])
def test_damaged_entry_is_rebuilt(tmp_path, text_dir, damage):
    cfg = DataConfig(path=str(text_dir), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg)
    expected = np.array(first.train_tokens), np.array(first.heldout_tokens)
    folder = entry(tmp_path / "cache")
    meta = folder / "meta.json"
    if damage == "truncate train":  # as if the process died while writing train.bin in place
        (folder / "train.bin").write_bytes((folder / "train.bin").read_bytes()[:100])
    elif damage == "drop meta":  # as if it died after the .bin files, before meta.json
        meta.unlink()
    elif damage == "garble meta":
        meta.write_text(meta.read_text()[:20])
    else:
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "fingerprint": "0" * 16}))
    messages: list[str] = []
    again = prepare_data(cfg, progress=messages.append)
    assert any("tokenizing" in m for m in messages)  # rebuilt, not trusted
    assert np.array_equal(again.train_tokens, expected[0]) and np.array_equal(again.heldout_tokens, expected[1])
    assert json.loads(meta.read_text())["splits"]["train"]["length"] == len(expected[0])


def test_meta_records_dtype_and_lengths(tmp_path, text_dir):
    data = prepare_data(DataConfig(path=str(text_dir), vocab_size=300, cache_dir=str(tmp_path / "cache")))
    folder = entry(tmp_path / "cache")
    meta = json.loads((folder / "meta.json").read_text())
    assert folder.name == meta["fingerprint"] == data.fingerprint
    assert np.dtype(meta["dtype"]) == np.uint16
    assert meta["splits"]["train"] == {"length": len(data.train_tokens), "documents": 4}
    assert (folder / "heldout.bin").stat().st_size == 2 * len(data.heldout_tokens)
    assert sorted(p.name for p in folder.iterdir()) == ["heldout.bin", "meta.json", "train.bin"]  # no *.tmp


def test_cache_dir_defaults_to_environment(tmp_path, text_dir, monkeypatch):
    monkeypatch.setenv("SPARSIFY_CACHE", str(tmp_path / "from_env"))
    prepare_data(DataConfig(path=str(text_dir), vocab_size=300))
    assert len(list((tmp_path / "from_env" / "tokenizers").glob("*.json"))) == 1
    assert (entry(tmp_path / "from_env") / "meta.json").is_file()


def test_failed_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "train.bin"

    def write_half(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt  # an interrupted run

    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, write_half)
    assert list(target.parent.iterdir()) == []
    write_atomic(target, lambda tmp: tmp.write_bytes(b"whole"))
    assert target.read_bytes() == b"whole" and [p.name for p in target.parent.iterdir()] == ["train.bin"]
