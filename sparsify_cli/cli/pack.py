"""`sparsify pack`: turn a trained checkpoint into a packed directory for the sparse kernels."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from sparsify_cli.cli.common import console, user_errors_exit
from sparsify_cli.pack.layout import REORDERS
from sparsify_cli.pack.pack import PackOptions

HELP = """Calibrate a trained ReLU checkpoint and write a packed directory for the sparse kernels.

Runs the model over held-out text (the checkpoint's own data by default, or data.key=value overrides),
removes neurons that never fire, orders neurons hot-first (the most frequent ones then run densely on a GPU,
the rest through the sparse kernels), and chooses per layer the TwELL compression factor that covers the
measured per-tile counts with a margin. Writes OUT/ with
model.safetensors, manifest.json and tokenizer.json, and prints a per-layer summary.

  sparsify pack runs/tiny --out runs/tiny-packed

  sparsify pack runs/tiny --out runs/tiny-packed --calib-tokens 65536 data.path=/data/calib.txt
"""


def pack(
    checkpoint: Path = typer.Argument(..., help="A run directory or checkpoint directory from `sparsify train`."),
    out: Path = typer.Option(..., "--out", "-o", help="The packed directory to create (must not exist or be empty)."),
    calib_tokens: Optional[int] = typer.Option(
        None, "--calib-tokens", help=f"Held-out tokens to calibrate on (default {PackOptions.calib_tokens})."
    ),
    reorder: Optional[str] = typer.Option(
        None, "--reorder", help=f"Neuron order: {' | '.join(REORDERS)} (default {PackOptions.reorder}; docs/PACK.md)."
    ),
    margin: Optional[float] = typer.Option(
        None, "--margin", help=f"Safety factor on the calibration counts (default {PackOptions.margin})."
    ),
    overrides: Optional[List[str]] = typer.Argument(None, help="data.key=value overrides for the calibration text."),
) -> None:
    _pack(checkpoint, out, calib_tokens, reorder, margin, list(overrides or []))


@user_errors_exit
def _pack(checkpoint, out, calib_tokens, reorder, margin, overrides) -> None:
    from sparsify_cli.pack import pack_checkpoint

    given = {"calib_tokens": calib_tokens, "reorder": reorder, "margin": margin}
    options = PackOptions(**{k: v for k, v in given.items() if v is not None})  # the defaults live in PackOptions
    manifest = pack_checkpoint(checkpoint, out, options, overrides, say=console.print)
    _print_summary(manifest, out)


def _print_summary(m: dict, out: Path) -> None:
    table = Table(title=f"packed {m['source']['checkpoint']} → {out}", title_justify="left")
    for col in ("layer", "H→kept", "mean", "p99", "max", "tile q99.9", "tile max", "T", "C", "slots", "overflow"):
        table.add_column(col, justify="right")
    for i, layer in enumerate(m["layers"]):
        s = layer["stats"]
        table.add_row(
            str(i), f"{layer['d_ffn_source']}→{layer['d_ffn']}", f"{s['mean_active']:.1f}", f"{s['p99_active']:.0f}",
            str(s["max_active"]), str(s["q999_per_tile"]), str(s["max_per_tile"]), str(layer["tile"]), str(layer["compression"]),
            str(layer["tile"] // layer["compression"]), f"{100 * s['overflow_fraction']:.3f}%",
        )
    console.print(table)
    for name, a in (("calibration tokens", m["agreement"]["calibration"]), (m["agreement"]["heldout"]["on"], m["agreement"]["heldout"])):
        console.print(
            f"agreement with the checkpoint on {a['tokens']:,} tokens ({name}): max |Δlogit| "
            f"{a['max_abs_logit_diff']:.2e}, mean {a['mean_abs_logit_diff']:.2e}, CE {a['ce_source']:.4f} → "
            f"{a['ce_packed']:.4f} ({a['ce_diff']:+.2e})",
            highlight=False,
        )
