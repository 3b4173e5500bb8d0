"""`sparsify bench --suite policy`: where the sparse path stops paying on this GPU, measured, and kept as its rule.

Each row is one density: dense (cuBLAS) vs the sparse path that ffn_forward runs (mode="sparse"), on
PERFORMANCE.md's inputs at that density, output checked against dense in the same run:

    prefill        tokens= (each > 64): gate GEMM + the fused sparse kernel, timed eagerly; densities from nnz=
    decode         decode= above FUSED_MAX_M: gate projection + the two decode kernels
    fused_decode   decode= up to FUSED_MAX_M: the fused decode kernels (gate projection included)

Decode rows are CUDA-graph replays over DECODE_LAYERS independent layers (so weights are not L2-resident between
repetitions, as in a model) at DECODE_DENSITIES of d_ffn. After the rows, kernels/device_policy.py turns each
kind's points into its density limit (the largest density at which sparse took <= 0.97x dense there and at every
lower one) and writes the GPU's policy file, which packed models loaded on this GPU then use.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

import torch

from sparsify_cli.bench.measure import compare, cuda_median_ms, nnz_stats, rel_err

# Decode densities (fractions of d_ffn) swept for the two decode kinds: around the H100 limits (3% and 6%).
DECODE_DENSITIES = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08)
DECODE_LAYERS = 4


def kind_of(m: int) -> str:
    """The policy limit that governs m tokens per call (kernels/ffn.py's routing)."""
    from sparsify_cli.kernels.ffn import DEFAULT_POLICY
    from sparsify_cli.kernels.launchers import FUSED_MAX_M

    if m > DEFAULT_POLICY.decode_max_m:
        return "prefill"
    return "fused_decode" if m <= FUSED_MAX_M else "decode"


def points(s) -> list[tuple[str, int, float]]:
    """(kind, tokens per call, target nnz) of every row, prefill first."""
    rows = [("prefill", m, float(nnz)) for m in s.tokens for nnz in s.nnz]
    rows += [(kind_of(m), m, d * s.d_ffn) for m in s.decode for d in DECODE_DENSITIES]
    return rows


def prefill_point(s, m: int, nnz: float) -> dict[str, Any]:
    from sparsify_cli.bench.ffn import dense_block
    from sparsify_cli.bench.synthetic import make_ffn_inputs
    from sparsify_cli.kernels import ffn_forward

    inp = make_ffn_inputs(m, s.d_model, s.d_ffn, nnz, device="cuda", seed=s.seed + m + int(nnz))
    x, gate, up, down = inp.x, inp.gate, inp.up, inp.down
    down_t = down.T.contiguous()
    row = {"kind": "prefill", "policy_kind": "prefill", "M": m, "D": s.d_model, "H": s.d_ffn, "nnz_target": nnz,
           **nnz_stats(x @ gate.T)}
    row.update(compare(lambda: dense_block(x, gate, up, down),
                       lambda: ffn_forward(x, gate, up, down_t, kernels="cuda", mode="sparse"),
                       device=torch.device("cuda"), tokens=m, reps=s.reps, warmup=s.warmup))
    row["density"] = row["nnz_mean"] / s.d_ffn
    row["sparse_path"] = "gate GEMM (cuBLAS) + the fused sparse kernel, every neuron (ffn_forward mode=sparse)"
    del inp, x, gate, up, down, down_t
    torch.cuda.empty_cache()
    return row


def decode_point(s, m: int, nnz: float) -> dict[str, Any]:
    from sparsify_cli.bench.ffn import dense_block, graph_replay
    from sparsify_cli.bench.synthetic import make_ffn_inputs
    from sparsify_cli.kernels import ffn_forward

    layers = [make_ffn_inputs(m, s.d_model, s.d_ffn, nnz, device="cuda", seed=s.seed + 100 + i)
              for i in range(DECODE_LAYERS)]
    x = layers[0].x
    downs_t = [p.down.T.contiguous() for p in layers]
    # the density is known, as a packed layer's calibrated nnz_hint makes it: this routes M <= FUSED_MAX_M to the
    # fused kernels and keeps the call free of host syncs (capturable)
    hints = [float(((x @ p.gate.T) > 0).sum(1).float().mean()) for p in layers]

    def sparse_one(i: int) -> torch.Tensor:
        p = layers[i]
        return ffn_forward(x, p.gate, p.up, downs_t[i], kernels="cuda", mode="sparse", nnz_hint=hints[i])

    kind = kind_of(m)
    row = {"kind": "decode (fused)" if kind == "fused_decode" else "decode", "policy_kind": kind, "M": m,
           "D": s.d_model, "H": s.d_ffn, "nnz_target": nnz, **nnz_stats(x @ layers[0].gate.T)}
    with torch.no_grad():
        row["rel_err"] = rel_err(sparse_one(0), dense_block(x, layers[0].gate, layers[0].up, layers[0].down))
    dense_all = graph_replay(lambda: [dense_block(x, p.gate, p.up, p.down) for p in layers])
    sparse_all = graph_replay(lambda: [sparse_one(i) for i in range(DECODE_LAYERS)])
    ms = cuda_median_ms({"dense": dense_all, "sparse": sparse_all}, s.reps, s.warmup)
    for name in ("dense", "sparse"):
        row[f"{name}_ms"] = ms[name] / DECODE_LAYERS
        row[f"{name}_tok_s"] = m / row[f"{name}_ms"] * 1e3
        row[f"{name}_peak_mb"] = row[f"{name}_mj_tok"] = None
    row["speedup"] = row["dense_ms"] / row["sparse_ms"]
    row["density"] = row["nnz_mean"] / s.d_ffn
    row["sparse_path"] = ("the fused decode kernels" if kind == "fused_decode" else
                          "gate projection + the two decode kernels") + f" (CUDA graphs, {DECODE_LAYERS} layers)"
    del layers, x, downs_t, dense_all, sparse_all
    torch.cuda.empty_cache()
    return row


def measure(s, kind: str, m: int, nnz: float) -> dict[str, Any]:
    """One row of points(s)."""
    return prefill_point(s, m, nnz) if kind == "prefill" else decode_point(s, m, nnz)


def point(row: dict[str, Any]) -> dict[str, Any]:
    """What device_policy keeps of a row."""
    return {k: row[k] for k in ("M", "nnz_mean", "density", "dense_ms", "sparse_ms")}


class PolicySuite:
    """The suite's rows and, once they ran, the policy they give (written to the GPU's policy file)."""

    def __init__(self, s, cache_dir: Optional[str] = None):
        self.s, self.cache_dir = s, cache_dir
        self.rows: list[dict[str, Any]] = []

    def cases(self) -> list[tuple[str, Callable[[], dict]]]:
        def run(kind: str, m: int, nnz: float) -> dict:
            row = measure(self.s, kind, m, nnz)
            self.rows.append(row)
            return row

        return [(f"{kind} M={m} nnz={nnz:g}", lambda kind=kind, m=m, nnz=nnz: run(kind, m, nnz))
                for kind, m, nnz in points(self.s)]

    def finish(self) -> dict[str, Any]:
        """The policy from the rows that ran, written to this GPU's policy file; the report's header fields."""
        from sparsify_cli.bench.report import environment as run_environment
        from sparsify_cli.kernels import device_policy as dp
        from sparsify_cli.kernels.ffn import DEFAULT_POLICY

        by_kind: dict[str, list[dict[str, Any]]] = {}
        for r in self.rows:
            by_kind.setdefault(r["policy_kind"], []).append(point(r))
        name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        environment = {**run_environment("cuda"), "shape": {"d_model": self.s.d_model, "d_ffn": self.s.d_ffn},
                       "settings": self.s.as_dict()}
        doc = dp.build(by_kind, name, capability, environment)
        # kinds not measured in this run (e.g. decode= without a fused size) keep the defaults
        for kind, field in dp.LIMIT_FIELDS.items():
            doc["limits"].setdefault(field, getattr(DEFAULT_POLICY, field))
        path = dp.policy_path(name, capability, self.cache_dir)
        replaced = _replaced_shape(path, (self.s.d_model, self.s.d_ffn))
        dp.save(doc, path)
        measured = ", ".join(f"{k}: {100 * doc['limits'][f]:.2f}%" for k, f in dp.LIMIT_FIELDS.items() if k in by_kind)
        defaults = ", ".join(f"{k}: {100 * getattr(DEFAULT_POLICY, f):.2f}%" for k, f in dp.LIMIT_FIELDS.items())
        notes = [f"sparse pays on this {name} at D {self.s.d_model} × H {self.s.d_ffn} up to these densities "
                 f"(sparse <= {dp.MARGIN}x dense there and at every lower density measured): {measured} (H100 "
                 f"defaults: {defaults}); written to {path}, which packed models loaded on this GPU now use"]
        if replaced:
            notes.append(f"this replaced the rule measured at {replaced}: a GPU keeps one rule, so measure at the "
                         "shape of the models you run")
        return {"policy": {"path": str(path), "limits": doc["limits"], "measured": sorted(by_kind)}, "notes": notes}


def _replaced_shape(path, shape: tuple[int, int]) -> Optional[str]:
    """The shape of the rule about to be overwritten at ``path``, when it is another than ``shape`` (the file
    holds one rule per GPU, so measuring at a toy shape replaces the rule models of the real one use)."""
    from sparsify_cli.kernels import device_policy as dp

    try:
        old = dp.measured_shape(json.loads(path.read_text()))
    except (OSError, ValueError, AttributeError):  # no file, or one that cannot be read: nothing to warn about
        return None
    return f"D {old[0]} × H {old[1]}" if old and old != shape else None
