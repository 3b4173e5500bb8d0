"""The tokenizer: an existing tokenizer.json, or a byte-level BPE trained on the train split and cached.

A trained tokenizer is a pure function of (train text, vocab size, the settings below): `tokenizers` breaks
ties between equally frequent merges by pair order, so the same corpus gives a byte-identical tokenizer.json.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sparsify_cli.data.cache import write_text_atomic
from sparsify_cli.data.corpus import Corpus, Progress
from sparsify_cli.errors import UserError

EOS_TOKEN = "<|endoftext|>"
# Document separators as different tokenizer families spell them (GPT-2, Llama 2, others, Llama 3).
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
# Part of the cache key: bump when the training settings below change.
BPE_RECIPE = "bytebpe-v1"


def load_tokenizer(path: str) -> Tokenizer:
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"tokenizer file {str(file)!r} does not exist; give a tokenizer.json or unset it to train one")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception for unreadable or malformed files
        raise UserError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def eos_id(tokenizer: Tokenizer, source: str) -> int:
    """Id of the document separator: the first of EOS_CANDIDATES that is a special token of the tokenizer."""
    specials = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    for token in EOS_CANDIDATES:
        if token in specials:
            return specials[token]
    raise UserError(
        f"{source}: no end-of-document special token; the tokenizer needs one of {', '.join(EOS_CANDIDATES)}"
    )


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def train_bpe(docs: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style: no unknown tokens, any text round-trips) with EOS_TOKEN as its only special."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the text or not
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tokenizer


def cached_bpe(corpus: Corpus, vocab_size: int, cache: Path, progress: Progress = None) -> Tokenizer:
    """The BPE for this corpus and vocab size: from the cache, or trained on the train split and cached."""
    path = cache / "tokenizers" / f"{BPE_RECIPE}-{corpus.fingerprint}-{vocab_size}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if progress:
        progress(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the train split…")
    start = time.perf_counter()
    tokenizer = train_bpe(corpus.train_docs, vocab_size)
    write_text_atomic(path, tokenizer.to_str())
    if progress:
        progress(f"tokenizer trained in {time.perf_counter() - start:.1f} s, cached at {path}")
    return tokenizer


def get_tokenizer(
    corpus: Corpus, vocab_size: int, cache: Path, path: Optional[str], progress: Progress = None
) -> tuple[Tokenizer, int]:
    """(tokenizer, eos id): loaded from `path` if given, else the cached or freshly trained BPE."""
    if path is not None:
        tokenizer = load_tokenizer(path)
        return tokenizer, eos_id(tokenizer, path)
    tokenizer = cached_bpe(corpus, vocab_size, cache, progress)
    return tokenizer, eos_id(tokenizer, "the trained tokenizer")
