"""`sparsify bench`: parse, plan the suite, run its rows under a progress bar, print the table, write the files."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch
import typer
from rich import box
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from sparsify_cli.cli.common import console, err_console, print_table, user_errors_exit

HELP = """Dense vs sparse, side by side in one run: speed, memory and energy.

  sparsify bench                                 # the machine's default: the ffn suite on a GPU, else cpu

  sparsify bench --suite ffn --device cuda       # the FFN block: CUDA kernels vs cuBLAS (PERFORMANCE.md's inputs)

  sparsify bench --suite ffn shapes=quick        # a smaller preset of the ffn suite

  sparsify bench --suite model runs/x-packed     # whole model: prefill, decode at batch 1…64, a training step

  sparsify bench --suite train                   # FFN forward + backward + L1: dense autograd vs the sparse op

  sparsify bench --suite model sparsity=0.99 layers=4   # synthetic weights with a chosen sparsity

  sparsify bench --suite policy                  # this GPU's dense/sparse crossover, kept as its rule

  sparsify bench --suite cpu --out bench.json --plot speedup.png   # + bench.csv beside the JSON

Every row: shape, measured active neurons per token (mean/max, max per 256-tile), dense and sparse median time
(CUDA events on a GPU, interleaved perf_counter on the CPU), the ratio, the sparse output's relative error
against dense (checked in the same run, on the same inputs), peak memory (GPU) and energy per token (NVIDIA
GPUs, NVML; needs pynvml). Settings are key=value words after the options: shapes (cpu: paper|small|tiny, ffn:
paper|quick, model: tiny|small|paper, train: paper|quick|small|tiny), tokens, decode, nnz, reps, warmup, threads,
seed; model: d_model, d_ffn, layers, heads, vocab, seq_len, batch, train_batch, context, sparsity, width, graphs
(true|false: on a GPU also the "decode (graphs)" rows, each decode step as CUDA-graph replays); train: d_model,
d_ffn, width (ELL width; 0: the training loop's rule), backend (cuda|torch), l1_coeff; policy: paper|quick,
d_model, d_ffn, tokens, decode, nnz. The policy suite writes what it measured as this GPU's policy file
(<cache>/policy/, cache = $SPARSIFY_CACHE or ~/.cache/sparsify); packed models loaded on this GPU then choose
dense or sparse per layer by it instead of the defaults measured on an H100.
"""


def bench(
    args: Optional[List[str]] = typer.Argument(None, help="key=value settings; for --suite model a checkpoint or packed dir."),
    suite: Optional[str] = typer.Option(None, "--suite", "-s", help="cpu, ffn, model, train or policy (default: ffn on a GPU, else cpu; model when a path is given)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: the suite's)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the report as JSON here, and the rows as CSV beside it."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of speed-up against sparsity (needs matplotlib)."),
    wandb: str = typer.Option("disabled", "--wandb", help="Log the rows to W&B: disabled, offline or online."),
) -> None:
    _bench(list(args or []), suite, device, out, plot, wandb)


@user_errors_exit
def _bench(args, suite, device, out, plot, wandb) -> None:
    from sparsify_cli.bench import report as rep
    from sparsify_cli.bench import settings as bs
    from sparsify_cli.bench import suites
    from sparsify_cli.errors import UserError

    overrides = [a for a in args if bs.is_override(a) and not Path(a).exists()]
    paths = [a for a in args if a not in overrides]
    if len(paths) > 1:
        raise UserError(f"one model path at most; got {', '.join(paths)}")
    if wandb not in ("disabled", "offline", "online"):
        raise UserError(f"--wandb {wandb!r} is not valid; choose one of: disabled, offline, online")
    if suite is None:
        suite = "model" if paths else suites.default_suite()[0]
    if suite not in bs.SUITES:
        raise UserError(f"unknown suite {suite!r}; choose one of: {', '.join(bs.SUITES)}")
    device = suites.resolve_device(suite, device)
    settings = bs.resolve(suite, device, overrides)
    if plot is not None:
        rep.require_matplotlib()  # fail before the work, not after it
    try:
        report = _run_cases(suite, device, settings, paths)
    except torch.OutOfMemoryError as exc:
        raise UserError(f"out of GPU memory running the {suite} suite ({str(exc).splitlines()[0][:80]}…); "
                        "lower batch=, train_batch=, tokens= or layers=") from None
    _print(report)
    if out is not None:
        json_path, csv_path = rep.write_report(report, out)
        console.print(f"report: {json_path} and {csv_path}", highlight=False)
    if plot is not None:
        console.print(f"plot: {rep.write_plot(report, plot)}", highlight=False)
    if wandb != "disabled":
        rep.log_wandb(report, wandb, (out.parent if out else Path(".")), warn=lambda s: err_console.print(s))


def _run_cases(suite, device, settings, paths) -> dict:
    from sparsify_cli.bench import report as rep
    from sparsify_cli.bench import suites

    cases, extra = suites.plan(settings, paths[0] if paths else None, say=lambda s: err_console.print(s, highlight=False))
    rows = []
    with suites.cpu_threads(settings), Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        env = rep.environment(device)  # inside: the thread count is the run's
        task = progress.add_task(f"bench {suite}", total=len(cases))
        for label, run in cases:
            progress.update(task, description=f"{suite}: {label}")
            rows.append({"suite": suite, **run()})
            progress.advance(task)
    return rep.build_report(settings.as_dict(), env, rows, extra())


def _print(report: dict) -> None:
    from sparsify_cli.bench.report import optional as o
    from sparsify_cli.bench.report import short_env

    s = report["settings"]
    timing = "CUDA events" if s["device"] == "cuda" else "perf_counter, interleaved"
    table = Table(title=f"sparsify bench --suite {s['suite']} shapes={s['shapes']} — {short_env(report['environment'])}",
                  caption=f"medians of {s['reps']} ({timing}) after {s['warmup']} warm-up; speed-up = dense ms / sparse ms; "
                  "rel err = ‖sparse − dense‖/‖dense‖ (model's train row: of all gradients; train suite: the worst "
                  "max|diff|/max|dense| over out, l1 and the gradients); nnz = active FFN neurons per token",
                  title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD)
    for col in ("kind", "tokens", "D×H", "nnz mean/max (tile)", "sparsity %", "dense ms", "sparse ms", "speed-up",
                "rel err", "tok/s dense → sparse", "peak MiB d/s", "mJ/tok d/s"):
        table.add_column(col, justify="left" if col == "kind" else "right", no_wrap=True)
    for r in report["rows"]:
        table.add_row(
            r["kind"] + (f" ×{r['layers']}L" if r.get("layers") else ""), str(r["M"]), f"{r['D']}×{r['H']}",
            f"{r['nnz_mean']:.1f}/{r['nnz_max']} ({r['max_per_tile']})", f"{100 * r['sparsity']:.2f}",
            o(r["dense_ms"], ".3f"), o(r["sparse_ms"], ".3f"),
            "–" if r["speedup"] is None else f"{r['speedup']:.2f}×", o(r["rel_err"], ".1e"),
            f"{o(r['dense_tok_s'], ',.0f')} → {o(r['sparse_tok_s'], ',.0f')}",
            f"{o(r['dense_peak_mb'], '.0f')}/{o(r['sparse_peak_mb'], '.0f')}",
            f"{o(r['dense_mj_tok'], '.3g')}/{o(r['sparse_mj_tok'], '.3g')}",
        )
    print_table(table)
    _print_packed(report)
    _print_train(report)
    for line in [*report.get("notes", []), *{r["notes"] for r in report["rows"] if r.get("notes")}]:
        console.print(f"note: {line}", highlight=False)
    if report.get("model"):
        console.print(f"model: {report['model']} ({report.get('parameters', 0):,} parameters, FFN backend "
                      f"{report.get('ffn_backend')})", highlight=False)
    details = [r["detail"] for r in report["rows"] if r.get("detail")]
    if details:  # bench/ffn.py's per-kernel table of the same rows
        from sparsify_cli.bench.ffn import format_table

        console.print("kernel detail (bench/ffn.py):", highlight=False)
        console.print(format_table({"rows": details}), highlight=False, soft_wrap=True)


def _print_packed(report: dict) -> None:
    """The ffn suite's packed_* columns: the same layers without the neurons pack removes."""
    from sparsify_cli.bench.report import optional as o

    rows = [r for r in report["rows"] if r.get("packed_ms") is not None]
    if not rows:
        return
    table = Table(title="the same layers as `sparsify pack` lays them out (neurons silent on the calibration tokens "
                  "removed)", caption="removed act. = share of the timed tokens' activations that fell on removed "
                  "neurons (pruning's price); speed-up against the same dense ms", title_justify="left",
                  caption_justify="left", box=box.SIMPLE_HEAD)
    for col in ("kind", "tokens", "width", "packed ms", "speed-up", "removed act. %"):
        table.add_column(col, justify="left" if col == "kind" else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["kind"], str(r["M"]), f"{r['packed_width']}/{r['H']}", o(r["packed_ms"], ".3f"),
                      f"{r['packed_speedup']:.2f}×", f"{100 * r['packed_removed_share']:.3f}")
    print_table(table)


def _print_train(report: dict) -> None:
    """The train suite's own columns: nnz tail, ELL width, memory and the error of every tensor."""
    from sparsify_cli.bench.report import optional as o

    rows = [r for r in report["rows"] if "err_dx" in r]
    if not rows:
        return
    table = Table(title="training op: error of each tensor (max|sparse − dense| / max|dense|) and against the "
                  f"{rows[0]['ref_dtype']} reference (sparse/dense, worst ratio)", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for col in ("tokens", "nnz mean/p99/max", "W", "tail rows", "peak MiB d/s", "out", "l1", "dx", "dG", "dU",
                "dDown", "vs ref s/d", "ratio"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            str(r["M"]), f"{r['nnz_mean']:.1f}/{r['nnz_p99']:.0f}/{r['nnz_max']}", str(r["width"]),
            f"{r['tail_rows']} ({100 * r['tail_share']:.1f}%)",
            f"{o(r['dense_peak_mb'], '.0f')}/{o(r['sparse_peak_mb'], '.0f')}",
            *(f"{r[f'err_{k}']:.1e}" for k in ("out", "l1", "dx", "dgate", "dup", "ddown")),
            f"{r['ref_err_sparse']:.1e}/{r['ref_err_dense']:.1e}", f"{r['ref_err_ratio']:.2f}",
        )
    print_table(table)
