"""`sparsify eval`: held-out quality, last-word accuracy, FFN sparsity per layer, TwELL tile overflow,
packed-vs-source agreement, for one model or several side by side; JSON report and PNG plots.

evaluate(paths, EvalOptions) -> report dict (runner.py); write_report(report, path); plots.write_plots(report, dir);
harness.py adapts our models to lm-evaluation-harness (the lm-eval extra).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from sparsify_cli.errors import UserError
from sparsify_cli.eval.runner import REPORT_VERSION, EvalOptions, evaluate

_OVERRIDE = re.compile(r"data\.[A-Za-z_]+=")


def split_arguments(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments -> (model paths, data.key=value overrides). An existing path is always a model
    (sweep run dirs have '=' in their names)."""
    models, overrides = [], []
    for a in args:
        if _OVERRIDE.match(a) and not Path(a).exists():
            overrides.append(a)
        else:
            models.append(a)
    return models, overrides


def write_report(report: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write the report to {path}: {exc.strerror or exc}") from None


__all__ = ["REPORT_VERSION", "EvalOptions", "evaluate", "split_arguments", "write_report"]
