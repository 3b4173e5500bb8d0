"""`sparsify train`: compose the config, run the trainer (once, or once per job of a sweep), print a summary."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from sparsify_cli.cli.common import console, user_errors_exit
from sparsify_cli.config.compose import DEFAULT_RECIPE, available_recipes, compose, expand_sweep, to_yaml

HELP = """Train a sparse (or dense baseline) model.

Configuration is a recipe (a complete experiment from recipes/) plus Hydra-style overrides:

  sparsify train                                   # the tiny default on the embedded corpus

  sparsify train --recipe paper_0.5b --out runs/p05 train.max_steps=2000

  sparsify train train.max_steps=50 sparsity.l1_coeff=1e-3 model.d_ffn=1024

  sparsify train -m sparsity.l1_coeff=0,1e-3,2e-3   # a sweep: one run directory per job

  sparsify train --out runs/tiny --resume           # continue an interrupted run exactly

  sparsify train --nproc 2 train.parallel=fsdp      # 2 processes via torchrun (or launch under torchrun yourself)

  sparsify train --recipe relufy --init /models/SmolLM2-135M --out runs/smol data.path=/data/corpus
                                                    # fine-tune a local Hugging Face model into a ReLU one

Groups (key=option): model, data, optim, sparsity, train, logger. Common keys: train.max_steps,
train.batch_size, train.seq_len, optim.lr, sparsity.l1_coeff, model.*, data.path, logger.wandb.mode
(offline|online|disabled). `sparsify train --show-config` prints every key with its value.
"""


def train(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=100"),
    recipe: str = typer.Option(DEFAULT_RECIPE, "--recipe", "-r", help="Recipe name (see --list-recipes) or a .yaml path."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: train.out_dir, runs/<run_name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in the run directory."),
    init: Optional[str] = typer.Option(
        None, "--init", help="Start from a local Hugging Face directory or a sparsify run (same as train.init=PATH)."
    ),
    multirun: bool = typer.Option(False, "--multirun", "-m", help="Sweep: comma-separated values run one job each."),
    show_config: bool = typer.Option(False, "--show-config", help="Print the composed configuration and exit."),
    list_recipes: bool = typer.Option(False, "--list-recipes", help="List the recipes and exit."),
    nproc: int = typer.Option(1, "--nproc", help="Processes to launch with torchrun (data parallel, train.parallel)."),
) -> None:
    _train(list(overrides or []), recipe, out, resume, multirun, show_config, list_recipes, init, nproc)


def _quoted(path: str) -> str:
    """A path as an override value: quoted when it holds characters the override grammar reads (, = space …)."""
    if re.fullmatch(r"[\w/.~+@-]+", path):
        return path
    if "'" in path or "\\" in path:
        from sparsify_cli.errors import UserError

        raise UserError(f"--init {path!r}: a path with quotes or backslashes cannot be passed on; rename or link it")
    return f"'{path}'"


@user_errors_exit
def _train(overrides, recipe, out, resume, multirun, show_config, list_recipes, init=None, nproc=1) -> None:
    if init:
        overrides = overrides + [f"train.init={_quoted(init)}"]
    if list_recipes:
        console.print("\n".join(available_recipes()))
        return
    jobs = expand_sweep(overrides) if multirun else [overrides]
    if not multirun and len(expand_sweep(overrides)) > 1:
        from sparsify_cli.errors import UserError

        raise UserError("an override has several values (a sweep): add -m/--multirun to run one job per value")
    configs = [compose(recipe, job) for job in jobs]  # all jobs validated before any work starts
    if show_config:
        for cfg in configs:
            console.print(to_yaml(cfg), highlight=False)
        return
    if nproc > 1:
        return _launch(nproc, configs, overrides, recipe, out, resume, multirun)
    for i, (job, cfg) in enumerate(zip(jobs, configs)):
        run_dir = _run_dir(cfg, out, job, overrides, i) if multirun else (out or Path(cfg.train.out_dir))
        if multirun:
            console.rule(f"job {i + 1}/{len(jobs)}: {' '.join(job) or '(no overrides)'}")
        _run_one(cfg, run_dir, resume)


def _run_dir(cfg, out: Optional[Path], job: list[str], overrides: list[str], index: int) -> Path:
    """runs/<run_name>-multirun/<index>_<the swept key=value pairs>."""
    swept = [j for j, o in zip(job, overrides) if j != o]
    base = out or Path(cfg.train.out_dir).parent / f"{cfg.run_name}-multirun"
    return base / (f"{index}_" + ",".join(swept).replace("/", "_"))


def _launch(nproc: int, configs, overrides, recipe, out, resume, multirun) -> None:
    """Re-run this command under torchrun with nproc processes, after checking what can be checked here."""
    import subprocess
    import sys

    import torch
    import torch.distributed

    from sparsify_cli.data import prepare_data
    from sparsify_cli.errors import UserError
    from sparsify_cli.train.distributed import check_batch_split, env_world

    if env_world().active:
        raise UserError("--nproc is for launching; this process already runs under torchrun")
    if not torch.distributed.is_available():
        raise UserError("this torch build has no torch.distributed: --nproc cannot work")
    for cfg in configs:
        check_batch_split(cfg.train.batch_size, cfg.train.grad_accum, nproc)
        uses_gpu = cfg.train.device.startswith("cuda") or (cfg.train.device == "auto" and torch.cuda.is_available())
        if uses_gpu and torch.cuda.device_count() < nproc:
            raise UserError(f"--nproc {nproc} needs {nproc} GPUs; {torch.cuda.device_count()} visible")
        if not resume and not cfg.train.init:
            prepare_data(cfg.data, progress=console.print)  # tokenize once here, not in every worker
    args = ["train", "--recipe", recipe, *(["--out", str(out)] if out else []), *(["--resume"] if resume else []),
            *(["-m"] if multirun else []), *overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "sparsify_cli.cli.app", *args]
    console.print(f"launching {nproc} processes: torchrun --nproc_per_node={nproc} -m sparsify_cli.cli.app {' '.join(args)}",
                  highlight=False)
    code = subprocess.call(cmd)
    if code:
        raise UserError(f"a training process failed (exit status {code}); its error is printed above")


def _run_one(cfg, run_dir: Path, resume: bool) -> None:
    from sparsify_cli.train import distributed

    try:
        _train_and_report(cfg, run_dir, resume)
    finally:
        distributed.shutdown()


def _train_and_report(cfg, run_dir: Path, resume: bool) -> None:
    from sparsify_cli.train.loop import Trainer

    trainer = Trainer(cfg, run_dir, resume=resume, console=console)
    if not trainer.dist.is_main:  # rank 0 speaks for the run
        trainer.run()
        return
    n_params = trainer.model.num_parameters()
    console.print(
        f"[bold]{cfg.run_name}[/]: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layers} layers, "
        f"FFN {cfg.model.ffn}/{cfg.model.activation} H={cfg.model.d_ffn}, λ={cfg.sparsity.l1_coeff:g}, "
        f"device {trainer.device}, {trainer.kernels.resolved} FFN kernels, {cfg.train.max_steps} steps → {run_dir}",
        highlight=False,
    )
    result = trainer.run()
    summary = {
        "run_name": cfg.run_name,
        "step": result.step,
        "train_ce": result.train_ce,
        "heldout_ce": result.heldout_ce,
        **{f"heldout_{k}": v for k, v in result.sparsity.items()},
        "d_ffn": trainer.model.cfg.d_ffn,
        "train_kernels": trainer.kernels.resolved,
        "layers": result.layers,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    table = Table(title="FFN activations on held-out text", title_justify="left")
    for col in ("layer", "mean active", "max active", "active %", "dead %"):
        table.add_column(col, justify="right")
    for i, layer in enumerate(s["layers"]):
        table.add_row(
            str(i),
            f"{layer['mean_active']:.1f}",
            str(layer["max_active"]),
            f"{100 * layer['mean_active'] / layer['d_ffn']:.2f}",
            f"{100 * layer['dead_fraction']:.1f}",
        )
    console.print(table)
    console.print(
        f"step {s['step']}: train CE {s['train_ce']:.4f}  held-out CE {s['heldout_ce']:.4f} "
        f"(ppl {pow(2.718281828459045, s['heldout_ce']):.1f})  FFN sparsity {100 * s['heldout_sparsity']:.2f}% "
        f"({s['heldout_active_mean']:.1f} of {s['d_ffn']} neurons active per token)",
        highlight=False,
    )
