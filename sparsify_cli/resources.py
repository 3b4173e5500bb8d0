"""Where the data that ships beside the code lives: conf/, recipes/ and kernels_cu/.

In a wheel they are copied to sparsify_cli/_resources/<name>; in a source checkout (editable install, tests)
they sit at the repository's top level. One function answers for both, so nothing else guesses paths.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """Return the directory of a shipped resource folder ("conf", "recipes" or "kernels_cu")."""
    for candidate in (_PACKAGE_DIR / "_resources" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"resource folder {name!r} not found next to {_PACKAGE_DIR}: the installation is incomplete"
    )
