"""What every on-disk artefact of sparsify shares: directories written atomically, versioned JSON read strictly.

Checkpoints and packed directories both use these, so "a crash never leaves half a directory" and "an unknown
version is refused with the reason" hold in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from sparsify_cli.errors import UserError


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success it replaces `final` (moved aside first, then
    removed), so at every instant either the old or the new complete directory exists. On failure the
    temporary directory is removed, the old one stays, and an OSError becomes a UserError."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        _fsync(tmp)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        _fsync(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            old.rename(final)
        raise UserError(f"could not write {final}: {exc.strerror or exc}; the previous one is intact") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: Path, text: str) -> None:
    """Write and fsync: the rename that publishes a directory must not outrun its contents."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_versioned_json(path: Path, fmt: str, version: int, remedy: str = "") -> dict[str, Any]:
    """Load JSON whose "format" must be `fmt` and "format_version" `version`; UserError otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else None
        raise UserError(f"{path} is not a {fmt} file (format={found!r})")
    if data.get("format_version") != version:
        raise UserError(
            f"{path} has {fmt} format version {data.get('format_version')}; this sparsify reads version {version}"
            + (f": {remedy}" if remedy else "")
        )
    return data
