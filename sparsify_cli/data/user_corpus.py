"""The user's own text: a .txt file (one document), a .jsonl file (one document a line) or a directory of them.

Files in a directory are read in sorted order of their relative paths (recursively, hidden files and folders
skipped), so the documents, the held-out split and the fingerprint do not depend on the file system's order.
Held out: the last `heldout_fraction` of the documents (at least one when there are two or more); a corpus
of a single document is split by characters instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsify_cli.data.corpus import Corpus, Progress
from sparsify_cli.errors import UserError

SUFFIXES = (".txt", ".jsonl")


def load_user_corpus(path: str, text_key: str, heldout_fraction: float, progress: Progress = None) -> Corpus:
    root = Path(path).expanduser()
    if progress:
        progress(f"reading {root}…")
    files = _corpus_files(root)
    docs = [doc for file in files for doc in _read_documents(file, text_key) if doc]  # "" adds nothing
    if not any(doc.strip() for doc in docs):
        raise UserError(f"data.path={path!r} holds no text: every document is empty")
    train, heldout = _split(docs, heldout_fraction, path)
    held = f"{len(heldout)} held out" if len(docs) > 1 else f"last {heldout_fraction:.0%} of its text held out"
    name = f"{root} ({_plural(len(files), 'file')}, {_plural(len(docs), 'document')}, {held})"
    return Corpus(train_docs=train, heldout_docs=heldout, name=name)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _corpus_files(root: Path) -> list[Path]:
    if not root.exists():
        raise UserError(f"data.path={str(root)!r} does not exist; give a .txt or .jsonl file or a directory of them")
    if root.is_file():
        if root.suffix not in SUFFIXES:
            raise UserError(f"data.path={str(root)!r} has an unsupported extension; use .txt or .jsonl")
        return [root]
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix in SUFFIXES and not _hidden(p, root)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise UserError(f"data.path={str(root)!r} is a directory without any .txt or .jsonl files")
    return files


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not valid UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror}") from None


def _read_documents(file: Path, text_key: str) -> list[str]:
    text = _read_text(file)
    if file.suffix == ".txt":
        return [text]
    return [_jsonl_text(line, file, number, text_key) for number, line in enumerate(text.splitlines(), 1)
            if line.strip()]  # blank lines (a trailing newline, spacing) are not documents


def _jsonl_text(line: str, file: Path, number: int, text_key: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{file}:{number}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(record, dict):
        raise UserError(f"{file}:{number}: a JSON {type(record).__name__}, not an object with a {text_key!r} field")
    if text_key not in record:
        keys = ", ".join(map(repr, record)) or "none"
        raise UserError(f"{file}:{number}: no {text_key!r} field (keys: {keys}); set data.text_key to the text field")
    value = record[text_key]
    if not isinstance(value, str):
        raise UserError(f"{file}:{number}: field {text_key!r} is a {type(value).__name__}, not a string")
    return value


def _split(docs: list[str], fraction: float, path: str) -> tuple[list[str], list[str]]:
    if len(docs) == 1:
        return _split_characters(docs[0], fraction, path)
    # At least one document on each side, whatever the fraction.
    n_heldout = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
    return docs[:-n_heldout], docs[-n_heldout:]


def _split_characters(doc: str, fraction: float, path: str) -> tuple[list[str], list[str]]:
    cut = round(len(doc) * (1 - fraction))
    if cut == 0 or cut == len(doc):
        raise UserError(f"data.path={path!r} is one document of {len(doc)} characters: too short to hold any out")
    return [doc[:cut]], [doc[cut:]]
