"""Where training metrics go: a local JSONL file and, through this module only, Weights & Biases.

W&B is imported lazily and is offline by default. Any failure to start it (no network, no key, bad entity)
is reported once and training continues without it: logging never blocks or kills a run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from sparsify_cli.config.schema import WandbConfig


class MetricsSink:
    def __init__(
        self,
        run_dir: Path,
        jsonl: bool,
        wandb_cfg: WandbConfig,
        run_name: str,
        config: dict[str, Any],
        wandb_id: str | None = None,
        warn: Callable[[str], None] = print,
    ):
        self.path = run_dir / "metrics.jsonl" if jsonl else None
        self.warn = warn
        self.wandb_run = None
        self.wandb_id = wandb_id
        if wandb_cfg.mode != "disabled":
            self._start_wandb(run_dir, wandb_cfg, run_name, config)

    def _start_wandb(self, run_dir: Path, cfg: WandbConfig, run_name: str, config: dict[str, Any]) -> None:
        mode = cfg.mode
        if mode == "online" and not _have_wandb_key():
            # Without a key wandb would ask for one on the terminal and wait: log offline instead.
            self.warn("logger.wandb.mode=online but no W&B API key (WANDB_API_KEY or ~/.netrc): logging offline; "
                      "upload later with `wandb sync`")
            mode = "offline"
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                config=config,
                dir=str(run_dir),
                mode=mode,
                id=self.wandb_id,
                resume="allow" if self.wandb_id else None,
                settings=wandb.Settings(init_timeout=60, console="off", silent=True),
            )
            self.wandb_id = self.wandb_run.id
        except Exception as exc:  # noqa: BLE001 — W&B failing must never stop training
            self.warn(f"W&B logging disabled: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            self.wandb_run = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            try:
                self.wandb_run.log(metrics, step=step)
            except Exception as exc:  # noqa: BLE001
                self.warn(f"W&B log failed, disabling it: {exc}")
                self.wandb_run = None

    def close(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish()
            except Exception:  # noqa: BLE001
                pass
            self.wandb_run = None


def _have_wandb_key() -> bool:
    """An API key in the environment or in ~/.netrc for the W&B host (what wandb itself looks for)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
