"""Loading an existing tokenizer.json (EOS detection, precedence, errors) and training a small BPE."""

from __future__ import annotations

import random

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from sparsify_cli.config.schema import DataConfig
from sparsify_cli.data import EOS_CANDIDATES, prepare_data
from sparsify_cli.data.tokenizer import train_bpe
from sparsify_cli.errors import UserError

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def word_tokenizer(path, words, eos: str | None, special: bool = True) -> str:
    """A WordLevel tokenizer.json over `words` (+ "[UNK]"), with `eos` added as a (special) token."""
    vocab = {w: i for i, w in enumerate(["[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos is not None:
        (tok.add_special_tokens if special else tok.add_tokens)([AddedToken(eos, special=special)])
    tok.save(str(path))
    return str(path)


@pytest.fixture
def text_dir(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_text(" ".join(WORDS[i:] + WORDS[:i]))
    return folder


@pytest.mark.parametrize("eos", EOS_CANDIDATES)
def test_existing_tokenizer_with_any_accepted_eos(tmp_path, text_dir, eos):
    path = word_tokenizer(tmp_path / "tok.json", WORDS, eos)
    data = prepare_data(DataConfig(path=str(text_dir), tokenizer_path=path, cache_dir=str(tmp_path / "c")))
    assert data.eos_id == len(WORDS) + 1 == data.tokenizer.token_to_id(eos)
    assert data.vocab_size == len(WORDS) + 2
    # Document 3 is held out: its words, then the separator.
    expected = [1 + WORDS.index(w) for w in WORDS[3:] + WORDS[:3]] + [data.eos_id]
    assert data.heldout_tokens.tolist() == expected


def test_argument_takes_precedence_over_config(tmp_path, text_dir):
    from_config = word_tokenizer(tmp_path / "config.json", WORDS, "</s>")
    from_checkpoint = word_tokenizer(tmp_path / "ckpt.json", list(reversed(WORDS)), "<eos>")
    cfg = DataConfig(path=str(text_dir), tokenizer_path=from_config, cache_dir=str(tmp_path / "c"))
    resumed = prepare_data(cfg, tokenizer_path=from_checkpoint)
    plain = prepare_data(cfg)
    assert resumed.tokenizer.token_to_id("alpha") == len(WORDS)  # reversed vocabulary: the checkpoint's
    assert plain.tokenizer.token_to_id("alpha") == 1
    assert resumed.fingerprint != plain.fingerprint  # same corpus, other tokenizer: other id and cache entry
    assert not np.array_equal(resumed.train_tokens, plain.train_tokens)


def test_large_vocabulary_gives_uint32_tokens(tmp_path, text_dir):
    many = WORDS + [f"w{i}" for i in range(70_000)]  # "kappa" etc. keep their small ids; the EOS gets a big one
    path = word_tokenizer(tmp_path / "big.json", many, "<|endoftext|>")
    data = prepare_data(DataConfig(path=str(text_dir), tokenizer_path=path, cache_dir=str(tmp_path / "c")))
    assert data.vocab_size > 65536 and data.train_tokens.dtype == data.heldout_tokens.dtype == np.uint32
    assert data.eos_id == len(many) + 1 and int(data.train_tokens[-1]) == data.eos_id


@pytest.mark.parametrize(
    "eos, special, expected",
    [(None, True, "no end-of-document special token"), ("<|endoftext|>", False, "no end-of-document special")],
)
def test_tokenizer_without_special_eos_is_refused(tmp_path, text_dir, eos, special, expected):
    path = word_tokenizer(tmp_path / "tok.json", WORDS, eos, special)
    cfg = DataConfig(path=str(text_dir), tokenizer_path=path, cache_dir=str(tmp_path / "c"))
    with pytest.raises(UserError, match=expected) as info:
        prepare_data(cfg)
    assert "tok.json" in str(info.value) and "</s>" in str(info.value)


def test_missing_or_malformed_tokenizer_file(tmp_path, text_dir):
    cache = str(tmp_path / "c")
    with pytest.raises(UserError, match=r"tokenizer file .*nope\.json' does not exist"):
        prepare_data(DataConfig(path=str(text_dir), cache_dir=cache), tokenizer_path=str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(UserError, match=r"bad\.json: not a valid tokenizer\.json") as info:
        prepare_data(DataConfig(path=str(text_dir), tokenizer_path=str(tmp_path / "bad.json"), cache_dir=cache))
    assert "\n" not in str(info.value)


def test_bpe_training_is_deterministic_and_round_trips():
    # Random words give many pairs of equal frequency: the ties are where an unstable order would show.
    rng = random.Random(0)
    docs = [" ".join("".join(rng.choices("abcdefghij", k=rng.randint(2, 6))) for _ in range(200)) for _ in range(20)]
    first, second = train_bpe(docs, 320), train_bpe(docs, 320)
    assert first.to_str() == second.to_str()
    assert first.get_vocab_size() == 320
    text = "Unseen bytes round-trip too: é, ß, 🦀."  # byte-level: no unknown token, ever
    assert first.decode(first.encode(text).ids) == text


def test_resuming_with_the_saved_tokenizer_keeps_the_fingerprint(tmp_path, text_dir):
    """A checkpoint stores the tokenizer; loading it back must give the same data id and reuse the cache."""
    cfg = DataConfig(path=str(text_dir), vocab_size=280, cache_dir=str(tmp_path / "c"))
    trained = prepare_data(cfg)
    saved = tmp_path / "ckpt" / "tokenizer.json"
    saved.parent.mkdir()
    trained.tokenizer.save(str(saved))  # pretty-printed: not byte-equal to the cached file, same tokenizer
    messages: list[str] = []
    resumed = prepare_data(cfg, tokenizer_path=str(saved), progress=messages.append)
    assert resumed.fingerprint == trained.fingerprint and resumed.eos_id == trained.eos_id
    assert np.array_equal(resumed.train_tokens, trained.train_tokens)
    assert not any("tokenizing" in m for m in messages)
