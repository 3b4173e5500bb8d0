"""`sparsify eval`: parse, call sparsify_cli.eval, print the tables, write the JSON report and the plots."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.table import Table

from sparsify_cli.cli.common import console, err_console, print_table, user_errors_exit

HELP = """How good is a sparse model, and how sparse is it really.

  sparsify eval runs/tiny                                   # a run dir, checkpoint dir or packed dir

  sparsify eval runs/tiny runs/tiny_relu --json report.json --plots plots/   # side by side

  sparsify eval runs/sweep/*/ --json sweep.json --plots sweep_plots/        # a λ sweep: CE against sparsity

  sparsify eval runs/tiny data.path=my_text/                # other held-out text (data.key=value)

  sparsify eval runs/tiny --tasks my_task --include-path my_tasks/   # lm-evaluation-harness tasks (lm-eval extra)

Reports held-out cross-entropy and perplexity, last-word accuracy on held-out passages (LAMBADA-style), and per
FFN layer the active neurons per token (mean, p99, max), dead neurons and how often a TwELL tile would overflow
at compression C = 8, 4, 2. A packed dir is also compared with its source checkpoint (logit and CE differences).
Compared models must share a tokenizer. The held-out text is the first model's (its data config plus data.*
overrides).
"""


def eval(  # noqa: A001 - the verb's name
    paths: List[str] = typer.Argument(..., help="Checkpoints (run or checkpoint dirs) or packed dirs, then data.key=value overrides."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the full report (every number) to this JSON file."),
    plots: Optional[Path] = typer.Option(None, "--plots", help="Write PNG plots into this folder (needs matplotlib)."),
    seq_len: int = typer.Option(0, "--seq-len", help="Window length; 0: the first model's training seq_len."),
    batch_size: int = typer.Option(16, "--batch-size", help="Windows per forward pass."),
    max_tokens: int = typer.Option(131072, "--max-tokens", help="Held-out tokens for CE and sparsity; 0: all of them."),
    skip_tokens: int = typer.Option(
        0, "--skip-tokens", help="Start the held-out windows this many tokens in (e.g. past a packed dir's calibration)."
    ),
    lastword: int = typer.Option(1000, "--lastword", help="Last-word passages (spread over the held-out text); 0: skip."),
    tile: int = typer.Option(256, "--tile", help="TwELL tile for the overflow analysis (narrower layers: one tile covering H)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated lm-evaluation-harness tasks (lm-eval extra)."),
    include_path: Optional[Path] = typer.Option(None, "--include-path", help="Folder of lm-eval task YAMLs (local data)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="lm-eval: at most this many documents per task."),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="Print the per-layer table of each model."),
) -> None:
    _eval(paths, json_out, plots, seq_len, batch_size, max_tokens, skip_tokens, lastword, tile, device, tasks,
          include_path, limit, layers)


@user_errors_exit
def _eval(paths, json_out, plots, seq_len, batch_size, max_tokens, skip_tokens, lastword, tile, device, tasks,
          include_path, limit, layers) -> None:
    from sparsify_cli.eval import EvalOptions, evaluate, split_arguments

    models, overrides = split_arguments(paths)
    if plots is not None:
        from sparsify_cli.eval.plots import require_matplotlib

        require_matplotlib()  # fail before the work, not after it
    options = EvalOptions(
        seq_len=seq_len, batch_size=batch_size, max_tokens=max_tokens, skip_tokens=skip_tokens, lastword=lastword,
        tile=tile, device=device,
        data_overrides=overrides, tasks=[t for t in (tasks or "").split(",") if t.strip()],
        include_path=str(include_path) if include_path else None, limit=limit,
    )
    report = evaluate(models, options, say=lambda s: err_console.print(s, highlight=False))
    if layers:
        for m in report["models"]:
            _print_layers(m)
    _print_comparison(report)
    if json_out is not None:
        from sparsify_cli.eval import write_report

        write_report(report, json_out)
        console.print(f"report: {json_out}", highlight=False)
    if plots is not None:
        from sparsify_cli.eval.plots import write_plots

        for path in write_plots(report, plots):
            console.print(f"plot: {path}", highlight=False)


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _print_comparison(report: dict) -> None:
    s = report["settings"]
    comps = [str(c) for c in s["compressions"]]
    table = Table(
        title=f"held-out quality and FFN sparsity ({s['heldout_tokens']:,} tokens, windows of {s['seq_len']}; "
        f"last word: {s['lastword_passages']} passages)",
        caption="C8/C4/C2: % of (token, tile) pairs over the TwELL capacity at compression C",
        title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD,
    )
    table.add_column("model", overflow="fold", min_width=12)
    for col in ("λ", "CE", "ppl", "last word %", "sparsity %", "mean act", "p99", "max", "dead %",
                *(f"C{c}" for c in comps)):
        table.add_column(col, justify="right", no_wrap=True)
    for m in report["models"]:
        q, sp = m["quality"], m["sparsity"]
        lam = m.get("l1_coeff")
        table.add_row(
            m["label"] + (" (packed)" if m["kind"] == "packed" else ""),
            f"{lam:g}" if isinstance(lam, (int, float)) else "?",
            f"{q['heldout_ce']:.4f}", f"{q['heldout_ppl']:.1f}", _pct(q["lastword"]["accuracy"], 1),
            _pct(sp["sparsity"]), f"{sp['mean_active']:.1f}", f"{sp['p99_active']:.0f}", str(sp["max_active"]),
            _pct(sp["dead_fraction"], 1), *(_pct(sp["overflow_tile_fraction"][c]) for c in comps),
        )
    print_table(table)
    for m in report["models"]:
        a = m.get("agreement")
        if a:
            console.print(
                f"{m['label']} (packed) vs {m['source_checkpoint']}: max |Δlogit| {a['max_abs_logit_diff']:.3g}, "
                f"mean |Δlogit| {a['mean_abs_logit_diff']:.3g}, CE {a['ce_packed']:.5f} vs {a['ce_source']:.5f} "
                f"(Δ {a['ce_diff']:+.2e})",
                highlight=False,
            )
        for task, metrics in (m.get("lm_eval") or {}).items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
            console.print(f"{m['label']} lm-eval {task}: {shown}", highlight=False)


def _print_layers(m: dict) -> None:
    table = Table(title=f"{m['label']}: FFN activations per layer (per token; dead: silent on every token)",
                  title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("layer", "H", "mean", "p99", "max", "active %", "dead %", "tile", "max/tile"):
        table.add_column(col, justify="right", no_wrap=True)
    comps = list(m["sparsity"]["layers"][0]["tiles"]["overflow"])
    for c in comps:
        table.add_column(f"C{c}", justify="right", no_wrap=True)
    for layer in m["sparsity"]["layers"]:
        t = layer["tiles"]
        table.add_row(
            str(layer["layer"]), str(layer["d_ffn"]), f"{layer['mean_active']:.1f}", f"{layer['p99_active']:.0f}",
            str(layer["max_active"]), _pct(layer["active_fraction"]), _pct(layer["dead_fraction"], 1),
            str(t["tile"]), str(t["max_per_tile"]), *(_pct(t["overflow"][c]["tile_fraction"]) for c in comps),
        )
    print_table(table)
