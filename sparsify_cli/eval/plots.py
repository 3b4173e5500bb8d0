"""PNG plots of an eval report (needs matplotlib: the `plots` extra).

    active_per_layer.png   mean (solid) and p99 (dashed) active FFN neurons per token, per layer, per model
    active_hist.png        distribution of active neurons per token (all layers), per model
    tile_overflow.png      share of (token, tile) pairs over the TwELL capacity at C = 8, 4, 2, per model
    tradeoff.png           (2+ models) held-out CE against FFN sparsity: the paper's trade-off curve
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsify_cli.errors import UserError
from sparsify_cli.plotting import pyplot, require_matplotlib  # noqa: F401 (re-exported for the CLI)


def _name(m: dict[str, Any]) -> str:
    lam = m.get("l1_coeff")
    tag = f" (λ={lam:g})" if isinstance(lam, (int, float)) and f"l1_coeff={lam:g}" not in m["label"] else ""
    return f"{m['label']}{tag}" if m["kind"] == "checkpoint" else f"{m['label']} (packed){tag}"


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    plt = pyplot()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the plot folder {out}: {exc.strerror or exc}") from None
    models = report["models"]
    written = [_active_per_layer(plt, models, out), _active_hist(plt, models, out), _tile_overflow(plt, report, out)]
    if len(models) >= 2:
        written.append(_tradeoff(plt, models, out))
    return written


def _legend(ax) -> None:
    """Legend outside the axes, on the right: it never hides data."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _active_per_layer(plt, models, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, m in enumerate(models):
        layers = m["sparsity"]["layers"]
        xs = [layer["layer"] for layer in layers]
        color = f"C{i % 10}"
        ax.plot(xs, [max(layer["mean_active"], 1e-2) for layer in layers], "o-", color=color, label=f"{_name(m)} mean")
        ax.plot(xs, [max(layer["p99_active"], 1e-2) for layer in layers], "x--", color=color, alpha=0.7)
    d_ffn = models[0]["sparsity"]["layers"][0]["d_ffn"]
    ax.axhline(d_ffn, color="grey", lw=0.8, ls=":")
    ax.text(0, d_ffn, f"H = {d_ffn}", va="bottom", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("active FFN neurons per token")
    ax.set_title("Active neurons per layer (solid: mean, dashed: p99)")
    ax.set_xticks(sorted({layer["layer"] for m in models for layer in m["sparsity"]["layers"]}))
    _legend(ax)
    ax.grid(alpha=0.3, which="both")
    return _save(plt, fig, out / "active_per_layer.png")


def _active_hist(plt, models, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, m in enumerate(models):
        pooled: list[int] = []
        for layer in m["sparsity"]["layers"]:
            hist = layer["active_hist"]
            pooled += [0] * (len(hist) - len(pooled))
            for k, c in enumerate(hist):
                pooled[k] += c
        total = sum(pooled)
        ax.hist(range(len(pooled)), bins=_int_log_bins(len(pooled)), weights=[c / total for c in pooled],
                histtype="step", lw=1.6, color=f"C{i % 10}", label=_name(m))
    ax.set_xscale("symlog", linthresh=1, linscale=0.4)  # linear around 0, logarithmic above 1
    ax.set_xlim(left=-0.5)
    ax.set_xlabel("active FFN neurons per token (all layers pooled)")
    ax.set_ylabel("share of (token, layer) pairs per bin")
    ax.set_title("How many neurons each token uses (bins: 0, 1, 2, … then wider)")
    _legend(ax)
    ax.grid(alpha=0.3)
    return _save(plt, fig, out / "active_hist.png")


def _int_log_bins(n: int) -> list[float]:
    """Bin edges at half-integers, each bin about 25% wider than the last: every bin holds whole counts."""
    edges, k = [-0.5, 0.5], 1.0
    while edges[-1] < n:
        k = max(k + 1, k * 1.25)
        edges.append(round(k) - 0.5)
    return edges


def _tile_overflow(plt, report, out: Path) -> Path:
    models = report["models"]
    comps = [str(c) for c in report["settings"]["compressions"]]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        fracs = [100 * m["sparsity"]["overflow_tile_fraction"][c] for c in comps]
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(comps))]
        ax.bar(xs, [max(f, 1e-4) for f in fracs], width, color=f"C{i % 10}", label=_name(m))
    layer0 = models[0]["sparsity"]["layers"][0]["tiles"]
    caps = [layer0["overflow"][c]["capacity"] for c in comps]
    ax.set_xticks(range(len(comps)), [f"C={c}\n(K={k} of {layer0['tile']})" for c, k in zip(comps, caps)])
    ax.set_yscale("log")
    ax.set_ylabel("% of (token, tile) pairs over capacity")
    ax.set_title(f"TwELL tile overflow (tile {layer0['tile']}; a bar at 1e-4 % means none)")
    _legend(ax)
    ax.grid(alpha=0.3, axis="y", which="both")
    return _save(plt, fig, out / "tile_overflow.png")


def _tradeoff(plt, models, out: Path) -> Path:
    """ReLU models as points (CE against sparsity); dense (SiLU) models, never exactly sparse, as dashed lines;
    the λ = 0 ReLU model also as a dotted line: how much quality each sparser model gives up."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    relu = [(i, m) for i, m in enumerate(models) if m.get("activation", "relu") == "relu"]
    # x: the active share 100 − sparsity on a log axis, reversed and labelled as sparsity, so that 90 %, 99 % and
    # 99.9 % are evenly spaced (a linear sparsity axis squeezes everything the paper cares about against 100 %).
    xs = {i: max(100 * (1 - m["sparsity"]["sparsity"]), 1e-3) for i, m in relu}
    ys = {i: m["quality"]["heldout_ce"] for i, m in relu}
    order = sorted(xs, key=xs.get)
    ax.plot([xs[i] for i in order], [ys[i] for i in order], "-", color="grey", lw=0.8)
    for i, m in relu:
        ax.plot(xs[i], ys[i], "o", color=f"C{i % 10}", label=_name(m))
        lam = m.get("l1_coeff")
        ax.annotate(f"λ={lam:g}" if isinstance(lam, (int, float)) else m["label"], (xs[i], ys[i]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
        if lam == 0:
            ax.axhline(ys[i], color=f"C{i % 10}", ls=":", lw=0.8)
    for i, m in enumerate(models):
        if m.get("activation", "relu") != "relu":
            ax.axhline(m["quality"]["heldout_ce"], color=f"C{i % 10}", ls="--", lw=1,
                       label=f"{_name(m)} ({m['activation']}, dense)")
    ax.set_xscale("log")
    lo, hi = min(xs.values(), default=1.0), max(xs.values(), default=10.0)
    ax.set_xlim(hi * 1.6, lo / 1.6)  # reversed: sparser to the right, with room for the labels
    ticks = [t for t in (50, 30, 10, 3, 1, 0.3, 0.1, 0.03, 0.01, 0.001) if lo / 1.6 <= t <= hi * 1.6]
    ax.set_xticks(ticks, [f"{100 - t:g}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("FFN activation sparsity (share of neurons exactly zero on held-out text; log scale of 100 % − it)")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.set_title("Quality against sparsity")
    ax.margins(y=0.12)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(plt, fig, out / "tradeoff.png")
