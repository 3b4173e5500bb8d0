"""The dense/sparse rule measured on this GPU: where a loaded model's SparsePolicy limits come from.

SparsePolicy's defaults were measured on an H100 (BENCHMARKS.md). Where sparse stops paying depends on the GPU:
its tensor-core rate (the dense GEMMs) against its L2 and memory bandwidth (the sparse gathers). So
`sparsify bench --suite policy` measures the crossover on the GPU at hand (bench/policy.py: dense vs the sparse
path over a sweep of densities for prefill, for decode above FUSED_MAX_M tokens and for the fused decode path)
and writes the three limits here:

    <cache>/policy/<gpu>-sm<major><minor>.json     cache: $SPARSIFY_CACHE, else ~/.cache/sparsify

A packed model loaded on that GPU takes them (pack/packed.py: load_packed sets each PackedFFN's policy and says
where the rule came from); without a file the H100 defaults stand and the note says how to measure. A file that
is unreadable, of another format or version, for another GPU, or with a limit outside [0, 1] is refused with
the reason (UserError), never half-used. One measured on other kernel sources (kernels_sha256) is used, and the
note says to measure again.

Importable without Hydra/OmegaConf (the GPU machine's tools import it).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from sparsify_cli.errors import UserError
from sparsify_cli.kernels.ffn import DEFAULT_POLICY, SparsePolicy

FORMAT = "sparsify-device-policy"
VERSION = 1
# A density counts as sparse-paying where the sparse path took at most MARGIN x dense time there and at every
# lower density measured: 3% margin for run-to-run noise (the defaults' rule, BENCHMARKS.md), and no "island" of
# a lucky point above a losing one.
MARGIN = 0.97
# Each measured kind and the SparsePolicy field its crossover sets.
LIMIT_FIELDS = {"prefill": "max_density", "decode": "decode_max_density", "fused_decode": "fused_decode_max_density"}
REMEDY = "measure again with `sparsify bench --suite policy` (or delete the file to use the H100 defaults)"


def kernels_digest() -> str:
    """sha256 of the kernel sources (kernels_cu/): a policy measured on other sources may no longer hold."""
    import hashlib

    from sparsify_cli.kernels.loader import kernel_dir

    h = hashlib.sha256()
    for f in sorted(kernel_dir().iterdir()):
        if f.suffix in (".cu", ".cuh"):
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def gpu_key(name: str, capability: Sequence[int]) -> str:
    """File-name key of a GPU: its name in lower case, non-alphanumerics as '-', and its compute capability."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return f"{slug}-sm{capability[0]}{capability[1]}"


def policy_path(name: str, capability: Sequence[int], cache_dir: Optional[str] = None) -> Path:
    """Where this GPU's policy file lives (nothing is created: loading a model needs no writable cache)."""
    from sparsify_cli.data.cache import cache_location

    return cache_location(cache_dir) / "policy" / f"{gpu_key(name, capability)}.json"


def crossover(points: Sequence[dict[str, float]], margin: float = MARGIN) -> float:
    """The largest measured density at which sparse paid (sparse_ms <= margin * dense_ms) there and at every lower
    measured density; 0.0 when it did not pay at the lowest one (then sparse is never chosen for that kind).
    points: dicts with density, dense_ms, sparse_ms."""
    if not points:
        raise ValueError("no measured points")
    limit = 0.0
    for p in sorted(points, key=lambda p: p["density"]):
        if p["sparse_ms"] > margin * p["dense_ms"]:
            break
        limit = float(p["density"])
    return limit


def build(points: dict[str, list[dict[str, Any]]], name: str, capability: Sequence[int],
          environment: dict[str, Any]) -> dict[str, Any]:
    """The policy document from measured points per kind (LIMIT_FIELDS' keys; each point: M, density, dense_ms,
    sparse_ms). A kind measured at several token counts takes the lowest crossover of them (the rule applies to
    all of them)."""
    unknown = set(points) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}")
    limits: dict[str, float] = {}
    for kind, pts in points.items():
        by_m: dict[int, list] = {}
        for p in pts:
            by_m.setdefault(int(p["M"]), []).append(p)
        limits[LIMIT_FIELDS[kind]] = min(crossover(v) for v in by_m.values())
    return {"format": FORMAT, "format_version": VERSION, "gpu": name, "capability": list(capability[:2]),
            "margin": MARGIN, "limits": limits, "kernels_sha256": kernels_digest(), "points": points,
            "environment": environment}


def save(doc: dict[str, Any], path: Path) -> None:
    """Write the document atomically (a crash leaves the old file or none, never half of one)."""
    from sparsify_cli.data.cache import write_atomic

    try:
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n"))
    except OSError as exc:
        raise UserError(f"cannot write the policy file {path}: {exc.strerror or exc}") from None


def load(path: Path, name: str, capability: Sequence[int]) -> tuple[SparsePolicy, dict[str, Any]]:
    """The policy in `path` for this GPU: DEFAULT_POLICY with the file's limits; UserError if the file is not a
    valid policy of this GPU."""
    from sparsify_cli.storage import read_versioned_json

    doc = read_versioned_json(path, FORMAT, VERSION, REMEDY)
    if doc.get("gpu") != name or list(doc.get("capability", []))[:2] != list(capability[:2]):
        raise UserError(f"{path} was measured on {doc.get('gpu')!r} (sm {doc.get('capability')}), not on this "
                        f"{name!r} (sm {list(capability[:2])}): {REMEDY}")
    limits = doc.get("limits")
    if not isinstance(limits, dict) or set(limits) != set(LIMIT_FIELDS.values()):
        raise UserError(f"{path} does not hold the limits {sorted(LIMIT_FIELDS.values())}: {REMEDY}")
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise UserError(f"{path}: {key}={value!r} is not a density in [0, 1]: {REMEDY}")
    return dataclasses.replace(DEFAULT_POLICY, **{k: float(v) for k, v in limits.items()}), doc


def describe(policy: SparsePolicy) -> str:
    return (f"sparse up to {100 * policy.max_density:.2f}% active (prefill), {100 * policy.decode_max_density:.1f}% "
            f"(decode), {100 * policy.fused_decode_max_density:.1f}% (fused decode)")


def measured_shape(doc: dict[str, Any]) -> Optional[tuple[int, int]]:
    """(d_model, d_ffn) a policy document was measured at, if it says."""
    shape = doc.get("environment", {}).get("shape") or {}
    try:
        return int(shape["d_model"]), int(shape["d_ffn"])
    except (KeyError, TypeError, ValueError):
        return None


def _shapes(shapes) -> str:
    return ", ".join(f"D {d} × H {h}" for d, h in sorted(shapes))


def for_device(device: Any = None, cache_dir: Optional[str] = None,
               shapes: Optional[set[tuple[int, int]]] = None) -> tuple[SparsePolicy, str]:
    """(policy, one line saying where it came from) for a CUDA device: the measured file if this GPU has one,
    else DEFAULT_POLICY. ``shapes``: the (D, H) of the layers it is for; where the file was measured at another
    shape the note says so (the crossover moves with the shape) and how to measure at theirs."""
    import torch

    name = torch.cuda.get_device_name(device)
    capability = torch.cuda.get_device_capability(device)
    path = policy_path(name, capability, cache_dir)
    if not path.exists():
        return DEFAULT_POLICY, (f"dense/sparse rule: the H100 defaults ({describe(DEFAULT_POLICY)}); "
                                f"`sparsify bench --suite policy` measures this {name}'s")
    policy, doc = load(path, name, capability)
    env = doc.get("environment", {})
    shape = measured_shape(doc)
    at = f"{_shapes([shape])}, " if shape else ""
    note = f"dense/sparse rule: measured on this {name} ({at}{env.get('date_utc', 'date unknown')}; {path}): " \
           f"{describe(policy)}"
    other = sorted(set(shapes or ()) - {shape}) if shape else []
    if other:
        d, h = other[0]
        note += (f"; this model's layers are {_shapes(other)}, where the crossover may differ: "
                 f"`sparsify bench --suite policy d_model={d} d_ffn={h}` measures at theirs")
    if doc.get("kernels_sha256") != kernels_digest():  # still the best measurement there is, but say so
        note += "; measured with other kernel sources than these: `sparsify bench --suite policy` to measure again"
    return policy, note
