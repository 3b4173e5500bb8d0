"""One honest dense-vs-sparse comparison: same inputs, both timed in the same run, output checked in the same run.

compare() is what every suite calls for one row: the two callables close over the same tensors, their outputs
are compared first (relative Frobenius error of sparse against dense), then both are timed, taking turns within
each repetition (medians of CUDA events on a GPU, of perf_counter on the CPU), then peak memory and energy are
measured per call. Nothing is cached between rows or reused from an earlier run.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from sparsify_cli.bench.energy import EnergyMeter


def cpu_median_ms(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per function; the functions take turns within each repetition, so load from other processes on
    the machine hits all of them alike and the ratios stay fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def cuda_median_ms(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 5) -> dict[str, float]:
    """Median ms per function from CUDA events, the functions taking turns within each repetition (as
    cpu_median_ms): a host-bound call (eager decode) drifts with the machine's load and clocks over seconds, and
    timing dense's reps all before sparse's put that drift into the ratio."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times[name].append(a.elapsed_time(b))
    return {name: statistics.median(t) for name, t in times.items()}


def kernel_ms(fn: Callable[[], object], name_len: int = 90) -> dict[str, float]:
    """GPU time per kernel name (ms, the first ``name_len`` characters) of one call of ``fn`` under torch.profiler,
    largest first (the profiling tools behind BENCHMARKS.md's breakdowns)."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            per[ev.name[:name_len]] += ev.device_time_total / 1000
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def rel_err(y: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 24) -> float:
    """‖y − ref‖ / ‖ref‖ in fp64 sums (Frobenius), in chunks: a prefill's logits need no fp32 copy of themselves."""
    y, ref = y.reshape(-1), ref.reshape(-1)
    if y.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(y.shape)} vs {tuple(ref.shape)}")
    num = den = 0.0
    for i in range(0, y.numel(), chunk):
        a, b = y[i:i + chunk].float(), ref[i:i + chunk].float()
        num += float((a - b).pow(2).sum(dtype=torch.float64))
        den += float(b.pow(2).sum(dtype=torch.float64))
    return (num / den) ** 0.5 if den > 0 else (0.0 if num == 0 else float("inf"))


def nnz_stats(act: torch.Tensor, hidden: Optional[int] = None, tile: int = 256) -> dict[str, float]:
    """Active neurons per token of act (…, H) (> 0 counts as active): mean, max, and the max per tile of ``tile``."""
    a = act.reshape(-1, act.shape[-1])  # (M, H)
    h = a.shape[1] if hidden is None else hidden
    on = a > 0
    per_tok = on.sum(1).float()  # (M,)
    pad = (-on.shape[1]) % tile
    tiles = torch.nn.functional.pad(on, (0, pad)).view(on.shape[0], -1, tile).sum(2) if on.numel() else on
    mean = float(per_tok.mean()) if per_tok.numel() else 0.0
    return {
        "nnz_mean": mean,
        "nnz_max": int(per_tok.max()) if per_tok.numel() else 0,
        "max_per_tile": int(tiles.max()) if tiles.numel() else 0,
        "sparsity": 1.0 - mean / max(h, 1),
    }


def peak_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """MiB allocated by one call of fn above what was allocated before it (CUDA caching allocator's peak);
    None on the CPU, where torch keeps no such counter."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak / 2**20


def compare(dense: Callable[[], torch.Tensor], sparse: Optional[Callable[[], torch.Tensor]], *, device: torch.device,
            tokens: int, reps: int, warmup: int, energy: Optional[EnergyMeter] = None,
            check: bool = True) -> dict:
    """Time dense and sparse (if any) on the same inputs; check sparse against dense first.

    Returns dense_ms, sparse_ms, speedup (dense/sparse), rel_err, dense/sparse tokens per second, peak MiB and
    mJ per token (None where not measured). ``tokens`` is the number of tokens one call processes.
    """
    row: dict = {}
    if sparse is not None and check:
        with torch.no_grad():
            row["rel_err"] = rel_err(sparse(), dense())
    fns = {"dense": dense} if sparse is None else {"dense": dense, "sparse": sparse}
    timer = cuda_median_ms if device.type == "cuda" else cpu_median_ms
    ms = timer(fns, reps, warmup)
    for name in ("dense", "sparse"):
        t = ms.get(name)
        row[f"{name}_ms"] = t
        row[f"{name}_tok_s"] = tokens / t * 1e3 if t else None
        row[f"{name}_peak_mb"] = peak_mb(fns[name], device) if name in fns else None
        row[f"{name}_mj_tok"] = (energy.mj_per_token(fns[name], tokens, t)
                                 if energy is not None and name in fns else None)
    row["speedup"] = row["dense_ms"] / row["sparse_ms"] if row.get("sparse_ms") else None
    row.setdefault("rel_err", None)
    return row
