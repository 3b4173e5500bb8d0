"""The rich progress bar of a training run: step, loss, CE, L1, sparsity, tokens/s and ETA.

On a terminal it redraws in place; elsewhere (CI, a log file) it prints one line per logging step instead.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def format_metrics(m: dict[str, Any]) -> str:
    parts = [f"loss {m['ce'] + m['l1_coeff'] * m['l1']:.3f}", f"CE {m['ce']:.3f}", f"L1 {m['l1']:.3g}"]
    if "sparsity" in m:
        parts.append(f"sparsity {100 * m['sparsity']:.1f}% ({m['active_mean']:.1f} active)")
    if "kernels/sparse_layers" in m:  # kernels=cuda: FFN layers that ran the sparse op this step
        parts.append(f"sparse FFNs {m['kernels/sparse_layers']}")
    if "tokens_per_s" in m:
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if "heldout_ce" in m:
        parts.append(f"held-out CE {m['heldout_ce']:.3f}")
    return "  ".join(parts)


class TrainProgress:
    def __init__(self, total: int, start: int, console: Console | None, enabled: bool = True):
        self.console = console or Console()
        self.live = enabled and self.console.is_terminal
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
            disable=not self.live,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, metrics="")
        self.total = total

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        text = format_metrics(metrics)
        self.progress.update(self.task, completed=step, metrics=text)
        if self.enabled and not self.live:
            self.console.print(f"step {step}/{self.total}  {text}")
