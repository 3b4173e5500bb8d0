"""The `sparsify` command: one Typer app, one small module per verb. No math here."""

from __future__ import annotations

import typer

from sparsify_cli.cli import bench as bench_cmd
from sparsify_cli.cli import eval as eval_cmd
from sparsify_cli.cli import export as export_cmd
from sparsify_cli.cli import pack as pack_cmd
from sparsify_cli.cli import train as train_cmd

app = typer.Typer(
    name="sparsify",
    help=(
        "Make transformer language models sparse, fast and light: train FFNs with ReLU and an L1 penalty "
        "so that most activations are exactly zero."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Keeps `sparsify <verb>` a group of verbs (Typer would otherwise run a lone verb without its name)."""


app.command(
    "train",
    context_settings={"allow_extra_args": False, "ignore_unknown_options": True},
    help=train_cmd.HELP,
)(train_cmd.train)

app.command("pack", help=pack_cmd.HELP)(pack_cmd.pack)
app.command("export", help=export_cmd.HELP)(export_cmd.export)
app.command("eval", help=eval_cmd.HELP)(eval_cmd.eval)
app.command("bench", help=bench_cmd.HELP)(bench_cmd.bench)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
