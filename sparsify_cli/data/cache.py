"""The cache directory and atomic writes into it.

Everything in the cache is keyed by content hashes, so an entry is either complete and right or absent: files
are written to a temporary name in the same directory and moved into place with os.replace, which is atomic.
An interrupted run leaves at worst a stray *.tmp file, never a half-written file under a trusted name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

from sparsify_cli.errors import UserError


def cache_location(cache_dir: Optional[str]) -> Path:
    """data.cache_dir if set, else $SPARSIFY_CACHE, else ~/.cache/sparsify (not created: readers use this)."""
    return Path(cache_dir or os.environ.get("SPARSIFY_CACHE") or "~/.cache/sparsify").expanduser()


def cache_root(cache_dir: Optional[str]) -> Path:
    """cache_location, created if missing (writers use this)."""
    root = cache_location(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the cache directory {root} ({e.strerror}); set data.cache_dir") from None
    return root


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) on a temporary path beside `path`, then move it into place in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is worth sharing with the rest of a team
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
