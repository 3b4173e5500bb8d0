"""matplotlib, loaded only when a plot is asked for (it is an optional extra), headless."""

from __future__ import annotations

from sparsify_cli.errors import UserError


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only); a UserError naming the extra when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'sparsify-cli[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Fail before the work, not after it."""
    pyplot()
