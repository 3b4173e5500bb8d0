"""Compare two `sparsify train` runs of the same recipe and seed (train.kernels=cuda against train.kernels=torch)
from their metrics.jsonl and summary.json; add the result to a JSON file and print a short table.

    python3 tests/gpu/compare_runs.py --json OUT/train_runs.json --name tiny RUN_CUDA RUN_TORCH \
        [--skip-steps 50] [--last-steps 50]

The first run is the candidate, the second the reference (differences are candidate − reference, relative to the
reference). Per run: tokens/s (median of the logged windows after --skip-steps, and the aggregate over the last
--last-steps steps), peak GPU memory (memory/peak_gib: the whole run, and the last steps), final held-out CE and
sparsity, and when the FFN layers switched to the sparse op (kernels/sparse_layers, layer<i>/ell_width; logged
every train.log_every steps, so a switch is seen at the first log line after it). Agreement: |CE_a − CE_b| of the
train CE at the steps both runs logged (same seed, same batches), max and mean, absolute and relative, over all
of them and over those where the candidate ran at least one FFN sparse.

The file may already hold other comparisons: --name replaces only its own entry. A missing or partial run (a
timeout) is reported with what its metrics.jsonl has; the exit status is 1 when a run has no metrics at all.
Used by tests/gpu/train_runs_on_device.sh; the logic is tested on CPU in tests/train/test_compare_runs.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Optional


def _num(v: Any) -> Optional[float]:
    """A metric value as a float (metrics.jsonl writes non-finite floats as strings), None when absent."""
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records in file order (unreadable lines, e.g. a line cut by a kill, are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def train_records(records: list[dict]) -> list[dict]:
    """The per-log-step training records (they have "ce"), by step; the final evaluation record has none."""
    return sorted((r for r in records if "ce" in r), key=lambda r: r["step"])


def windows(train: list[dict]) -> list[tuple[int, int, dict]]:
    """(first step, last step, record) of each logging window: the steps after the previous log line up to this
    one (tokens_per_s and memory/peak_gib describe that window)."""
    out, prev = [], 0
    for r in train:
        out.append((prev, r["step"], r))
        prev = r["step"]
    return out


def tokens_per_s_median(train: list[dict], skip_steps: int) -> Optional[float]:
    """Median tokens/s of the windows that start after the first skip_steps steps (warm-up, compilation)."""
    rates = [_num(r.get("tokens_per_s")) for start, _, r in windows(train) if start >= skip_steps]
    rates = [x for x in rates if x is not None and x > 0]
    return statistics.median(rates) if rates else None


def tokens_per_s_last(train: list[dict], last_steps: int) -> Optional[float]:
    """Tokens/s over the last `last_steps` steps (the windows that lie inside them): total tokens / total time.
    Every step has the same number of tokens, so that is Σ steps / Σ (steps / rate) over those windows."""
    if not train:
        return None
    end = train[-1]["step"]
    steps = time = 0.0
    for start, stop, r in windows(train):
        rate = _num(r.get("tokens_per_s"))
        if start >= end - last_steps and rate and rate > 0:
            steps += stop - start
            time += (stop - start) / rate
    return steps / time if time > 0 else None


def n_layers(records: list[dict]) -> int:
    keys = {k for r in records for k in r}
    n = 0
    while f"layer{n}/active_mean" in keys:
        n += 1
    return n


def sparse_switches(train: list[dict], layers: int) -> Optional[dict]:
    """When FFN layers ran the sparse op, from kernels/sparse_layers and layer<i>/ell_width (None: a run without
    the per-layer policy, i.e. kernels=torch)."""
    logged = [(r["step"], int(r["kernels/sparse_layers"])) for r in train if "kernels/sparse_layers" in r]
    if not logged:
        return None
    changes = [[s, n] for i, (s, n) in enumerate(logged) if i == 0 or n != logged[i - 1][1]]
    first_with = {}
    for k in range(1, layers + 1):
        first_with[str(k)] = next((s for s, n in logged if n >= k), None)
    per_layer = {}
    for i in range(layers):
        key = f"layer{i}/ell_width"
        flags = [(r["step"], int(r.get(key, 0)) > 0, int(r.get(key, 0))) for r in train if "kernels/sparse_layers" in r]
        sparse_steps = [s for s, on, _ in flags if on]
        per_layer[str(i)] = {
            "first_sparse_step": sparse_steps[0] if sparse_steps else None,
            "sparse_share_of_log_lines": len(sparse_steps) / len(flags) if flags else 0.0,
            "last_ell_width": flags[-1][2] if flags else 0,
        }
    # The step from which every later log line has all layers sparse (None if the run did not end that way).
    all_from = None
    for s, n in reversed(logged):
        if n < layers:
            break
        all_from = s
    return {
        "changes": changes,  # [step, number of sparse layers] at each log line where the number changed
        "first_step_with_at_least": first_with,  # k -> first logged step with >= k sparse layers
        "all_sparse_from_step": all_from,
        "per_layer": per_layer,
    }


def summarize_run(run_dir: Path, skip_steps: int, last_steps: int) -> dict:
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    train = train_records(records)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    final = next((r for r in reversed(records) if "heldout_ce" in r and "ce" not in r), {})
    layers = n_layers(records)
    end = train[-1]["step"] if train else 0
    mem = [(start, _num(r.get("memory/peak_gib"))) for start, _, r in windows(train)]
    mem_all = [m for _, m in mem if m is not None]
    mem_last = [m for start, m in mem if m is not None and start >= end - last_steps]
    last_sparse = [int(r["kernels/sparse_layers"]) for start, _, r in windows(train)
                   if start >= end - last_steps and "kernels/sparse_layers" in r]
    return {
        "dir": str(run_dir),
        "train_kernels": summary.get("train_kernels"),
        "complete": bool(summary),  # summary.json is written after the final evaluation and checkpoint
        "log_lines": len(train),
        "steps": end,
        "n_layers": layers,
        "tokens_per_s_median": tokens_per_s_median(train, skip_steps),
        "tokens_per_s_last": tokens_per_s_last(train, last_steps),
        "peak_memory_gib": max(mem_all) if mem_all else None,
        "peak_memory_gib_last": max(mem_last) if mem_last else None,
        "final_train_ce": _num(train[-1]["ce"]) if train else None,
        "final_heldout_ce": _num(summary.get("heldout_ce", final.get("heldout_ce"))),
        "final_heldout_sparsity": _num(summary.get("heldout_sparsity", final.get("heldout_sparsity"))),
        "final_heldout_active_mean": _num(summary.get("heldout_active_mean", final.get("heldout_active_mean"))),
        "final_train_sparsity": _num(train[-1].get("sparsity")) if train else None,
        "sparse_layers_last_steps": last_sparse,  # kernels/sparse_layers at the log lines of the last steps
        "sparse_switches": sparse_switches(train, layers),
    }


def _stats(diffs: list[tuple[float, float]]) -> dict:
    """max and mean of |a − b| and |a − b| / |b| over (a, b) pairs."""
    if not diffs:
        return {"n": 0, "max_abs": None, "mean_abs": None, "max_rel": None, "mean_rel": None}
    ab = [abs(a - b) for a, b in diffs]
    rel = [abs(a - b) / abs(b) for a, b in diffs if b]  # a zero reference has no relative difference
    return {"n": len(diffs), "max_abs": max(ab), "mean_abs": sum(ab) / len(ab), "max_rel": max(rel, default=None),
            "mean_rel": sum(rel) / len(rel) if rel else None}


def ce_agreement(candidate: list[dict], reference: list[dict]) -> dict:
    """Train CE at the steps both runs logged: over all of them, and over the candidate's sparse steps."""
    ref = {r["step"]: _num(r["ce"]) for r in reference}
    pairs, sparse_pairs, worst = [], [], None
    for r in candidate:
        a, b = _num(r["ce"]), ref.get(r["step"])
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        pairs.append((a, b))
        if int(r.get("kernels/sparse_layers", 0)) > 0:
            sparse_pairs.append((a, b))
        if worst is None or abs(a - b) > worst[1]:
            worst = (r["step"], abs(a - b))
    out = {"all_logged_steps": _stats(pairs), "steps_with_sparse_layers": _stats(sparse_pairs),
           "worst_step": worst[0] if worst else None}
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def compare(candidate_dir: Path, reference_dir: Path, skip_steps: int, last_steps: int) -> dict:
    a = summarize_run(candidate_dir, skip_steps, last_steps)
    b = summarize_run(reference_dir, skip_steps, last_steps)
    agreement = ce_agreement(train_records(read_records(candidate_dir)), train_records(read_records(reference_dir)))
    ha, hb = a["final_heldout_ce"], b["final_heldout_ce"]
    agreement["final_heldout_ce"] = {
        "abs": abs(ha - hb) if ha is not None and hb is not None else None,
        "rel": abs(ha - hb) / abs(hb) if ha is not None and hb else None,
    }
    return {
        "settings": {"skip_steps": skip_steps, "last_steps": last_steps},
        "runs": {"candidate": a, "reference": b},
        "agreement": agreement,
        "speedup": {  # candidate / reference
            "tokens_per_s_median": _ratio(a["tokens_per_s_median"], b["tokens_per_s_median"]),
            "tokens_per_s_last": _ratio(a["tokens_per_s_last"], b["tokens_per_s_last"]),
        },
        "memory_ratio": {  # candidate / reference
            "peak": _ratio(a["peak_memory_gib"], b["peak_memory_gib"]),
            "peak_last": _ratio(a["peak_memory_gib_last"], b["peak_memory_gib_last"]),
        },
    }


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.3f}%"


def table(name: str, result: dict) -> str:
    a, b = result["runs"]["candidate"], result["runs"]["reference"]
    skip, last = result["settings"]["skip_steps"], result["settings"]["last_steps"]
    head = (f"{name}", a["train_kernels"] or Path(a["dir"]).name, b["train_kernels"] or Path(b["dir"]).name, "ratio")
    rows = [
        ("steps (complete run)", f"{a['steps']} ({'yes' if a['complete'] else 'no'})",
         f"{b['steps']} ({'yes' if b['complete'] else 'no'})", ""),
        (f"tokens/s median (after step {skip})", _f(a["tokens_per_s_median"], ",.0f"),
         _f(b["tokens_per_s_median"], ",.0f"), _f(result["speedup"]["tokens_per_s_median"], ".3f")),
        (f"tokens/s last {last} steps", _f(a["tokens_per_s_last"], ",.0f"), _f(b["tokens_per_s_last"], ",.0f"),
         _f(result["speedup"]["tokens_per_s_last"], ".3f")),
        ("peak GiB (run)", _f(a["peak_memory_gib"], ".2f"), _f(b["peak_memory_gib"], ".2f"),
         _f(result["memory_ratio"]["peak"], ".3f")),
        (f"peak GiB (last {last} steps)", _f(a["peak_memory_gib_last"], ".2f"), _f(b["peak_memory_gib_last"], ".2f"),
         _f(result["memory_ratio"]["peak_last"], ".3f")),
        ("final train CE", _f(a["final_train_ce"], ".4f"), _f(b["final_train_ce"], ".4f"), ""),
        ("held-out CE", _f(a["final_heldout_ce"], ".4f"), _f(b["final_heldout_ce"], ".4f"), ""),
        ("held-out sparsity %", _f(a["final_heldout_sparsity"] and 100 * a["final_heldout_sparsity"], ".2f"),
         _f(b["final_heldout_sparsity"] and 100 * b["final_heldout_sparsity"], ".2f"), ""),
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    sw = a["sparse_switches"]
    if sw:
        lines.append(f"sparse layers (candidate) [step, n] at changes: {sw['changes']}; "
                     f"all {a['n_layers']} sparse from step {sw['all_sparse_from_step']}; "
                     f"at the last {last} steps' log lines: {a['sparse_layers_last_steps']}")
    else:
        lines.append("sparse layers (candidate): none logged (no per-layer policy in this run)")
    ag = result["agreement"]
    for key, label in (("all_logged_steps", "all logged steps"), ("steps_with_sparse_layers", "steps with sparse FFNs")):
        s = ag[key]
        if s["n"]:
            lines.append(f"|CE_a - CE_b| over {label} ({s['n']}): max {s['max_abs']:.4g} ({_pct(s['max_rel'])}), "
                         f"mean {s['mean_abs']:.4g} ({_pct(s['mean_rel'])})")
    h = ag["final_heldout_ce"]
    if h["abs"] is not None:
        lines.append(f"|held-out CE_a - CE_b|: {h['abs']:.4g} ({_pct(h['rel'])})")
    return "\n".join(lines)


def update_json(path: Path, name: str, result: dict) -> dict:
    """Put `result` under `name` in the JSON file at `path` (other entries are kept)."""
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data[name] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return data


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("candidate", type=Path, help="run directory (train.kernels=cuda)")
    ap.add_argument("reference", type=Path, help="run directory (train.kernels=torch)")
    ap.add_argument("--json", type=Path, required=True, help="JSON file to add this comparison to")
    ap.add_argument("--name", required=True, help="key of this comparison in the JSON file")
    ap.add_argument("--skip-steps", type=int, default=50, help="warm-up steps left out of the tokens/s median")
    ap.add_argument("--last-steps", type=int, default=50, help="steps at the end for tokens/s and memory")
    args = ap.parse_args(argv)
    result = compare(args.candidate, args.reference, args.skip_steps, args.last_steps)
    update_json(args.json, args.name, result)
    print(table(args.name, result))
    missing = [r["dir"] for r in result["runs"].values() if not r["log_lines"]]
    if missing:
        print(f"no metrics in: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
