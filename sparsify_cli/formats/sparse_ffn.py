"""Pure-torch sparse FFN forward: touches only the rows of U and Downᵀ of active neurons (runs on CPU).

    gated: out = (relu(x·Gᵀ + gb) ⊙ (x·Uᵀ + ub))·Downᵀ + db
    plain: out = relu(x·Uᵀ + ub)·Downᵀ + db
Weights are nn.Linear-style: gate_w, up_w (H, D); down_w (D, H). The sparse paths take down_t = down_w.T made
contiguous (H, D) once, offline (see down_rows()), so that an active neuron's Down column is one contiguous row.

The sparse part works on a list of active (token m, neuron j, gate value a) pairs: u = x_m·U_j + ub_j,
h = a·u, out_m += h·Downᵀ_j. Two equivalent ways to compute it (chosen by cost, same result to fp32 rounding):
  "pairs": gather per pair, index_add into out: work ∝ nnz·D (what the CUDA kernels do);
  "union": gather the rows of the neurons active in ANY token (J), one small GEMM x·U_Jᵀ, h = A_J ⊙ u, h·Downᵀ_J:
           work ∝ M·|J|·D but as BLAS calls; at M = 1 it is exactly the active rows.
twell_ffn_forward is the CPU reference of the kernels' fused up/down op on a TwELL.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify_cli.formats.twell import TwELL

METHODS = ("auto", "pairs", "union")
# "auto" takes "union" while M·|J| <= _UNION_FACTOR · nnz: on the 2-core CPU measured with bench/cpu.py (fp32,
# D = 2048) a gathered pair cost ~19 µs and a union GEMM element ~0.12 µs, so union won at every M <= 256 tried.
# At M = 1, M·|J| == nnz and union always wins.
_UNION_FACTOR = 128
_PAIRS_CHUNK = 8192  # pairs per gather step (bounds the (chunk, D) temporaries)
# torch runs an index_select of at most this many elements on one thread (at::internal::GRAIN_SIZE).
_SERIAL_GATHER_ELEMS = 32768
_SERIAL_GATHER_MAX_PIECES = 64


def down_rows(down_w: Tensor) -> Tensor:
    """Offline layout of Down for the sparse paths: (D, H) nn.Linear weight -> contiguous (H, D)."""
    return down_w.t().contiguous()


def _serial_rows(n: int, d: int) -> int:
    """Rows per piece for a row op on (n, D) done in pieces that torch keeps on one thread; 0: one call is better.

    Measured on the shared 2-core CPU under load: one index_select of 32 rows of 2048 floats with 2 threads took
    ~5-8 ms (waking the second OpenMP thread while another process holds that core), index_add_ of 30 rows ~60 ms;
    in pieces of 16 rows, under 10 µs each. Large ops keep the single parallel call, which amortizes the wake-up.
    """
    rows = max(1, _SERIAL_GATHER_ELEMS // max(d, 1))
    if n <= rows or n > rows * _SERIAL_GATHER_MAX_PIECES or torch.get_num_threads() == 1:
        return 0
    return rows


def gather_rows(w: Tensor, idx: Tensor) -> Tensor:
    """w.index_select(0, idx): (n, D); small gathers (decode) run in single-threaded pieces (see _serial_rows)."""
    n, d = idx.numel(), w.shape[1]
    rows = _serial_rows(n, d)
    if not rows:
        return w.index_select(0, idx)
    out = w.new_empty(n, d)  # (n, D)
    for r0 in range(0, n, rows):
        torch.index_select(w, 0, idx[r0 : r0 + rows], out=out[r0 : r0 + rows])
    return out


def add_rows(out: Tensor, idx: Tensor, src: Tensor) -> Tensor:
    """out.index_add_(0, idx, src) for src (n, D); small ones in single-threaded pieces (see _serial_rows)."""
    rows = _serial_rows(idx.numel(), src.shape[1])
    if not rows:
        return out.index_add_(0, idx, src)
    for r0 in range(0, idx.numel(), rows):
        out.index_add_(0, idx[r0 : r0 + rows], src[r0 : r0 + rows])
    return out


def _check_ffn(x: Tensor, up_w: Tensor, down_t: Tensor, gate_w: Optional[Tensor] = None) -> None:
    if x.dim() != 2:
        raise ValueError(f"FFN input x must be 2-D (M, D); got shape {tuple(x.shape)}")
    d = x.shape[1]
    if up_w.dim() != 2 or up_w.shape[1] != d:
        raise ValueError(f"up_w must be (H, D={d}); got {tuple(up_w.shape)}")
    h = up_w.shape[0]
    if gate_w is not None and tuple(gate_w.shape) != (h, d):
        raise ValueError(f"gate_w must be (H={h}, D={d}) like up_w; got {tuple(gate_w.shape)}")
    if tuple(down_t.shape) != (h, d):
        raise ValueError(f"down_t must be (H={h}, D={d}) = down_w.T (use down_rows(down_w)); got {tuple(down_t.shape)}")


# ---- dense references ------------------------------------------------------------------------------------------


def dense_ffn_forward(x, gate_w, up_w, down_w, gate_b=None, up_b=None, down_b=None) -> Tensor:
    """Gated FFN, three dense matmuls. x (M, D) -> (M, D)."""
    h = torch.relu(F.linear(x, gate_w, gate_b)) * F.linear(x, up_w, up_b)  # (M, H)
    return F.linear(h, down_w, down_b)  # (M, D)


def dense_plain_ffn_forward(x, up_w, down_w, up_b=None, down_b=None) -> Tensor:
    """Non-gated FFN, two dense matmuls. x (M, D) -> (M, D)."""
    return F.linear(torch.relu(F.linear(x, up_w, up_b)), down_w, down_b)  # (M, D)


# ---- the sparse part on a list of (token, neuron, activation) pairs ---------------------------------------------


def _pick(method: str, n_rows: int, n_union: int, nnz: int) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method != "auto":
        return method
    return "union" if n_rows * n_union <= _UNION_FACTOR * nnz else "pairs"


def _sparse_part(x: Tensor, m: Tensor, j: Tensor, a: Tensor, up_w: Optional[Tensor], up_b: Optional[Tensor],
                 down_t: Tensor, method: str) -> Tensor:
    """Σ over pairs (m, j, a) of a·(x_m·U_j + ub_j)·Downᵀ_j into (M, D); up_w None: Σ a·Downᵀ_j (plain FFN)."""
    n_rows, d = x.shape[0], down_t.shape[1]
    out = torch.zeros(n_rows, d, dtype=x.dtype, device=x.device)  # (M, D)
    if m.numel() == 0:
        return out
    a = a.to(x.dtype)
    # Row gathers go through gather_rows (index_select), never w[idx]: see gather_rows for the measurements.
    union, inv = torch.unique(j, return_inverse=True)  # (|J|,), (N,)
    if _pick(method, n_rows, union.numel(), m.numel()) == "union":
        h = torch.zeros(n_rows, union.numel(), dtype=x.dtype, device=x.device)  # (M, |J|)
        h[m, inv] = a
        if up_w is not None:
            ub = None if up_b is None else up_b.index_select(0, union)
            h = h * F.linear(x, gather_rows(up_w, union), ub)  # (M, |J|)
        return torch.mm(h, gather_rows(down_t, union), out=out)
    for e0 in range(0, m.numel(), _PAIRS_CHUNK):
        mc, jc, hc = m[e0 : e0 + _PAIRS_CHUNK], j[e0 : e0 + _PAIRS_CHUNK], a[e0 : e0 + _PAIRS_CHUNK]  # (n,)
        if up_w is not None:
            u = (gather_rows(x, mc) * gather_rows(up_w, jc)).sum(dim=1)  # (n,)
            if up_b is not None:
                u = u + up_b.index_select(0, jc)
            hc = hc * u
        add_rows(out, mc, hc.unsqueeze(1) * gather_rows(down_t, jc))  # (n, D) scattered to tokens
    return out


def _add_bias(out: Tensor, down_b: Optional[Tensor]) -> Tensor:
    return out if down_b is None else out + down_b


# ---- public sparse forwards -------------------------------------------------------------------------------------


def sparse_ffn_forward(x: Tensor, gate_w: Tensor, up_w: Tensor, down_t: Tensor, gate_b: Optional[Tensor] = None,
                       up_b: Optional[Tensor] = None, down_b: Optional[Tensor] = None, method: str = "auto") -> Tensor:
    """Gated FFN using only active neurons. x (M, D), gate_w/up_w (H, D), down_t (H, D) -> (M, D).

    The gate is computed densely (it decides the pattern); U and Down are read only at active neurons.
    """
    _check_ffn(x, up_w, down_t, gate_w)
    a = F.linear(x, gate_w, gate_b).relu_()  # (M, H)
    m, j = a.nonzero(as_tuple=True)  # (N,) active pairs: a != 0, so NaN counts as active
    return _add_bias(_sparse_part(x, m, j, a[m, j], up_w, up_b, down_t, method), down_b)


def sparse_plain_ffn_forward(x: Tensor, up_w: Tensor, down_t: Tensor, up_b: Optional[Tensor] = None,
                             down_b: Optional[Tensor] = None, method: str = "auto") -> Tensor:
    """Non-gated FFN: the up projection is dense (it decides the pattern); Down is read only at active neurons."""
    _check_ffn(x, up_w, down_t)
    a = F.linear(x, up_w, up_b).relu_()  # (M, H)
    m, j = a.nonzero(as_tuple=True)
    return _add_bias(_sparse_part(x, m, j, a[m, j], None, None, down_t, method), down_b)


def _overflow_rows(tw: TwELL, x: Tensor, what: str, have_weights: bool) -> Tensor:
    if tw.n_rows != x.shape[0]:
        raise ValueError(f"TwELL has {tw.n_rows} rows but x has {x.shape[0]} tokens")
    rows = tw.row_overflow.nonzero().squeeze(1)  # (R,)
    if rows.numel() and not have_weights:
        raise ValueError(f"TwELL has {rows.numel()} overflow row(s); {what} is needed to compute them exactly")
    return rows


def twell_ffn_forward(x: Tensor, tw: TwELL, up_w: Tensor, down_t: Tensor, gate_w: Optional[Tensor] = None,
                      gate_b: Optional[Tensor] = None, up_b: Optional[Tensor] = None,
                      down_b: Optional[Tensor] = None, method: str = "auto") -> Tensor:
    """Gated FFN from a TwELL of the gate a = relu(x·Gᵀ + gb): CPU reference of the fused up/down kernel.

    Rows without overflow: out_m = Σ_entries a_bf16·(x_m·U_j + ub_j)·Downᵀ_j + db (gate values as stored, bf16).
    Overflow rows: the dense gated FFN in x's dtype, which needs gate_w (and gate_b); ValueError without it.
    """
    _check_ffn(x, up_w, down_t, gate_w)
    if tw.n_cols != up_w.shape[0]:
        raise ValueError(f"TwELL has H={tw.n_cols} columns but up_w has H={up_w.shape[0]}")
    over = _overflow_rows(tw, x, "gate_w", gate_w is not None)
    m, j, a = tw.entries()  # overflow rows left out
    out = _add_bias(_sparse_part(x, m, j, a, up_w, up_b, down_t, method), down_b)
    if over.numel():
        out[over] = dense_ffn_forward(x[over], gate_w, up_w, down_t.t(), gate_b, up_b, down_b)
    return out


def twell_plain_ffn_forward(x: Tensor, tw: TwELL, down_t: Tensor, up_w: Optional[Tensor] = None,
                            up_b: Optional[Tensor] = None, down_b: Optional[Tensor] = None,
                            method: str = "auto") -> Tensor:
    """Non-gated FFN from a TwELL of h = relu(x·Uᵀ + ub): out_m = Σ_entries h_bf16·Downᵀ_j + db.

    Overflow rows are computed by the dense plain FFN, which needs up_w (and up_b); ValueError without it.
    """
    if x.dim() != 2 or down_t.dim() != 2 or down_t.shape[1] != x.shape[1] or down_t.shape[0] != tw.n_cols:
        raise ValueError(f"need x (M, D) and down_t (H={tw.n_cols}, D); got {tuple(x.shape)}, {tuple(down_t.shape)}")
    over = _overflow_rows(tw, x, "up_w", up_w is not None)
    m, j, a = tw.entries()
    out = _add_bias(_sparse_part(x, m, j, a, None, None, down_t, method), down_b)
    if over.numel():
        _check_ffn(x, up_w, down_t)
        out[over] = dense_plain_ffn_forward(x[over], up_w, down_t.t(), up_b, down_b)
    return out
