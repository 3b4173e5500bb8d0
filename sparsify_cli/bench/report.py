"""A benchmark report: the conditions (header), the rows, and where they go (JSON, CSV, PNG, W&B).

    {"format": "sparsify-bench", "format_version": 1,
     "environment": {...},          # GPU name, driver, torch, CUDA, CuPy (or CPU model, threads, load), date
     "settings": {...},             # suite, device, preset and every setting
     "notes": [...],                # what was not measured and why (energy, memory), the GPU's clocks
     "clocks": {...},               # GPU runs: SM clock median / lowest while busy, power-capped share (clocks.py)
     "rows": [{kind, M, D, H, nnz_mean, nnz_max, max_per_tile, sparsity, dense_ms, sparse_ms, speedup,
               rel_err, dense/sparse_tok_s, dense/sparse_peak_mb, dense/sparse_mj_tok, ...}, ...]}

The CSV beside the JSON has one line per row and the common columns, plus the suite-specific ones its rows have
(CSV_EXTRA_COLUMNS); nested details stay in the JSON.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import torch

from sparsify_cli.errors import UserError
from sparsify_cli.plotting import pyplot, require_matplotlib  # noqa: F401 (re-exported for the CLI)

REPORT_FORMAT, REPORT_VERSION = "sparsify-bench", 1
CSV_COLUMNS = (
    "suite", "kind", "M", "D", "H", "layers", "nnz_target", "nnz_mean", "nnz_max", "max_per_tile", "sparsity",
    "dense_ms", "sparse_ms", "speedup", "rel_err", "dense_tok_s", "sparse_tok_s", "dense_peak_mb", "sparse_peak_mb",
    "dense_mj_tok", "sparse_mj_tok", "sparse_path", "notes",
)
# Columns of some suites or devices only (the train suite's, the model suite's training step, the GPU's clocks):
# written when a row has them.
CSV_EXTRA_COLUMNS = (
    "nnz_p99", "tail_rows", "tail_share", "width", "backend", "dtype", "l1_coeff", "err_out", "err_l1", "err_dx",
    "err_dgate", "err_dup", "err_ddown", "ref_err_sparse", "ref_err_dense", "ref_err_ratio", "op_nnz_mean",
    "loss_dense", "loss_sparse", "dense_nnz_mean", "sparse_nnz_mean", "gpu", "packed_width", "packed_ms",
    "packed_speedup", "packed_removed_share", "sm_mhz_median", "sm_mhz_min", "power_capped_share",
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001
        pass
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no pynvml, no nvidia-smi)"


def environment(device: str) -> dict[str, Any]:
    """The conditions of the run: versions, hardware, machine load."""
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        env["load_average"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every platform
        pass
    if device == "cuda":
        from sparsify_cli.bench.ffn import environment as gpu_environment

        env.update(gpu_environment())  # GPU name, capability, CUDA, CuPy, NVRTC
        env["driver"] = _driver()
    return env


def build_report(settings: dict[str, Any], env: dict[str, Any], rows: list[dict], extra: dict[str, Any]) -> dict:
    return {"format": REPORT_FORMAT, "format_version": REPORT_VERSION, "environment": env, "settings": settings,
            **extra, "rows": rows}


def _clean(v: Any) -> Any:
    """JSON without NaN/inf (strict parsers refuse them): non-finite floats become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write_report(report: dict, path: str | Path) -> tuple[Path, Path]:
    """Write PATH (JSON) and PATH with .csv (the rows' common columns); return both paths."""
    path = Path(path)
    csv_path = path.with_suffix(".csv")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_clean(report), indent=1, allow_nan=False) + "\n")
        columns = [*CSV_COLUMNS, *(c for c in CSV_EXTRA_COLUMNS if any(c in row for row in report["rows"]))]
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for row in report["rows"]:
                w.writerow({k: ("" if v is None else v) for k, v in _clean(row).items()})
    except OSError as exc:
        raise UserError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    return path, csv_path


def plot_series(report: dict) -> dict[str, list[tuple[float, float]]]:
    """label -> [(sparsity %, speed-up)] sorted by sparsity: one series per (kind, tokens per call), and the ffn
    suite's packed twins (rows with packed_speedup) as "<label>, packed"."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in report["rows"]:
        if r.get("speedup") is None or r.get("sparsity") is None:
            continue
        label = f"{r['kind']} M={r['M']}" + (f" ({r['layers']} layers)" if r.get("layers") else "")
        series.setdefault(label, []).append((100 * r["sparsity"], r["speedup"]))
        if r.get("packed_speedup") is not None:
            series.setdefault(f"{label}, packed", []).append((100 * r["sparsity"], r["packed_speedup"]))
    return {label: sorted(pts) for label, pts in series.items()}


def write_plot(report: dict, path: str | Path) -> Path:
    """Speed-up (dense time / sparse time) against measured sparsity, one line per (kind, tokens per call); the ffn
    suite's packed twins (packed_speedup) as dashed lines beside them."""
    plt = pyplot()
    path = Path(path)
    series = plot_series(report)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colors: dict[str, str] = {}  # a series and its packed twin share a colour
    for label, pts in series.items():
        packed = label.endswith(", packed")
        base = label.removesuffix(", packed")
        colors.setdefault(base, f"C{len(colors) % 10}")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=colors[base],
                ls="--" if packed else "-", mfc="none" if packed else colors[base])
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    env, s = report["environment"], report["settings"]
    ax.set_xlabel("FFN activation sparsity (%), measured")
    ax.set_ylabel("speed-up vs dense (×)")
    ax.set_title(f"sparsify bench --suite {s['suite']} ({env.get('gpu') or env.get('cpu', '')})", fontsize=9)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise UserError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return path


def log_wandb(report: dict, mode: str, run_dir: Path, warn=print) -> None:
    """Log the rows to W&B through train/metrics.py's MetricsSink (the one module that imports wandb); a
    failure is a warning, never an error."""
    from sparsify_cli.config.schema import WandbConfig
    from sparsify_cli.train.metrics import MetricsSink

    s = report["settings"]
    sink = MetricsSink(run_dir, False, WandbConfig(mode=mode), f"bench-{s['suite']}-{s['shapes']}",
                       {"environment": report["environment"], "settings": s}, warn=warn)
    try:
        for i, row in enumerate(report["rows"]):
            sink.log(i, {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    finally:
        sink.close()


def short_env(env: dict[str, Any]) -> str:
    """One header line: the hardware and the versions."""
    if "gpu" in env:
        return (f"{env['gpu']} (sm {env.get('capability')}), driver {env.get('driver')}, torch {env['torch']}, "
                f"CUDA {env.get('cuda')}, CuPy {env.get('cupy')}")
    return (f"{env['cpu']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, torch {env['torch']}, "
            f"load average {env.get('load_average', '?')}")


def optional(v: Optional[float], fmt: str) -> str:
    return "–" if v is None else format(v, fmt)
