"""Sparse training op for the FFN with the L1 term: the exact pure-torch reference the CUDA kernels must match.

    res = sparse_ffn_train(x, gate_w, up_w, down_w, gate_b=None, up_b=None, down_b=None, width=128)
      x (M, D); gate_w, up_w (H, D); down_w (D, H) (nn.Linear layouts); gate_b, up_b (H,), down_b (D,) or None
      gated: a = x·Gᵀ + gb (dense: it decides the pattern), P = {(m, j): a_mj > 0}
             h_mj = a_mj · (x_m·U_j + ub_j) on P, 0 elsewhere
      plain  (gate_w=None): a = x·Uᵀ + ub, P as above, h = a on P
      res.out          (M, D)  Σ_{j∈P_m} h_mj · Down[:, j] + db
      res.l1           ()      mean_m Σ_j |h_mj| (layer_l1's definition), in x's dtype promoted to at least fp32
      res.token_counts (M,)    int64, non-zero h per token     } statistics (SparsityTracker.observe_sparse);
      res.neuron_counts (H,)   int64, tokens with non-zero h   } not differentiable

Everything after the gate GEMM works on the pattern only. The gate is packed with formats.pack_hybrid: rows with
at most `width` active neurons are ELL rows (per-pair work through gathers), rows with more go WHOLE to the dense
tail and are computed by dense products over those R rows, masked by P. Every row is computed exactly, whatever
the sparsity: no row is dropped, nothing is capped.

Saved for backward (never the dense (M, H) activations): x, the weights (references to the parameters), the gate
values g in the hybrid layout (values (M, W), cols (M, W), counts (M,), tail_rows (R,), tail (R, H)) and, gated,
u = x·U_j + ub_j at the same positions (u_ell (M, W), u_tail (R, H), zero off P). Memory O(M·(D + 3W) + 2·R·H);
R·H < nnz·H/W, so while most rows fit in the ELL it is O(M·D + nnz) up to a constant.

backward (gy = ∂L/∂out, gl1 = ∂L/∂l1), on P only:
    dh_mj = gy_m·Down[:, j] + (gl1 / M)·sign(h_mj)
    dDown[:, j] = Σ_m h_mj gy_m
    gated: dg = dh·u, du = dh·g;  plain: da = dh (the ReLU's derivative is 1 on P, 0 off it)
    dX_m = Σ_j dg_mj G_j + du_mj U_j        (token-major: the ELL rows)
    dG_j = Σ_m dg_mj x_m, dU_j = Σ_m du_mj x_m, dgb_j = Σ_m dg_mj, dub_j = Σ_m du_mj, ddb = Σ_m gy_m
                                             (neuron-major: formats.transpose_hybrid, CSC, filtered to the ELL)
Biases are supported (all three, each optional). docs/TRAINING_KERNELS.md is the plan for the CUDA kernels.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify_cli.formats.hybrid import DEFAULT_WIDTH, HybridELL, pack_hybrid, transpose_hybrid
from sparsify_cli.formats.sparse_ffn import add_rows, gather_rows

_CHUNK = 8192  # pairs per gather step: bounds the (chunk, D) temporaries


class SparseFFNTrainOut(NamedTuple):
    out: Tensor  # (M, D)
    l1: Tensor  # () mean_m Σ_j |h_mj|
    token_counts: Tensor  # (M,) int64
    neuron_counts: Tensor  # (H,) int64


# ---- pair helpers (the ELL part): the work a kernel does per (token, neuron) pair --------------------------------


def _pair_dots(a: Tensor, b: Tensor, ia: Tensor, ib: Tensor) -> Tensor:
    """(N,): a[ia_e] · b[ib_e] for row-index lists ia, ib (N,)."""
    out = a.new_empty(ia.numel())
    for e0 in range(0, ia.numel(), _CHUNK):
        sl = slice(e0, e0 + _CHUNK)
        out[sl] = (gather_rows(a, ia[sl]) * gather_rows(b, ib[sl])).sum(dim=1)
    return out


def _scatter_pairs(out: Tensor, dst: Tensor, w: Tensor, idx: Tensor, coef: Tensor) -> Tensor:
    """out[dst_e] += coef_e · w[idx_e] for all e; out (n, D), w (*, D), dst/idx/coef (N,)."""
    for e0 in range(0, dst.numel(), _CHUNK):
        sl = slice(e0, e0 + _CHUNK)
        add_rows(out, dst[sl], coef[sl].unsqueeze(1) * gather_rows(w, idx[sl]))  # (n, D)
    return out


def _ell_pairs(hy: HybridELL) -> tuple[Tensor, Tensor, Tensor]:
    """Live ELL slots, row-major (token, then ascending neuron): token m, neuron j, flat slot s = m·W + k (int64)."""
    width = hy.width
    live = (torch.arange(width, device=hy.cols.device) < hy.counts.unsqueeze(1)) & ~hy.in_tail.unsqueeze(1)  # (M, W)
    m, k = live.nonzero(as_tuple=True)
    return m, hy.cols[m, k].to(torch.int64), m * width + k


def _ell_pairs_neuron_major(hy: HybridELL) -> tuple[Tensor, Tensor, Tensor]:
    """The same live ELL slots in neuron-major order (neuron, then ascending token): (m, j, s), from the CSC.

    transpose_hybrid covers the tail too; its entries (src >= M·W) are left out here because tail rows are
    computed by the dense products. A kernel walks col_ptr segments: one neuron's sum, no atomics.
    """
    t = transpose_hybrid(hy)
    neuron = torch.repeat_interleave(torch.arange(t.n_cols, device=t.col_ptr.device), t.counts)  # (N,)
    ell = t.src < hy.n_rows * hy.width
    return t.rows[ell].to(torch.int64), neuron[ell], t.src[ell]


def _check(x: Tensor, gate_w: Optional[Tensor], up_w: Tensor, down_w: Tensor, gate_b: Optional[Tensor],
           up_b: Optional[Tensor], down_b: Optional[Tensor], width: int) -> None:
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"sparse_ffn_train: x must be (M, D) with M >= 1; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"sparse_ffn_train: x must be floating point; got {x.dtype}")
    d = x.shape[1]
    if up_w.dim() != 2 or up_w.shape[1] != d:
        raise ValueError(f"sparse_ffn_train: up_w must be (H, D={d}); got {tuple(up_w.shape)}")
    h = up_w.shape[0]
    want = {"gate_w": (h, d), "down_w": (d, h), "gate_b": (h,), "up_b": (h,), "down_b": (d,)}
    given = {"gate_w": gate_w, "down_w": down_w, "gate_b": gate_b, "up_b": up_b, "down_b": down_b}
    for name, t in given.items():
        if t is None:
            continue
        if tuple(t.shape) != want[name]:
            raise ValueError(f"sparse_ffn_train: {name} must be {want[name]}; got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"sparse_ffn_train: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; "
                "cast them first (the op does no autocast)"
            )
    if up_w.dtype != x.dtype or up_w.device != x.device:
        raise ValueError(f"sparse_ffn_train: up_w is {up_w.dtype} on {up_w.device} but x is {x.dtype} on {x.device}")
    if gate_w is None and gate_b is not None:
        raise ValueError("sparse_ffn_train: gate_b given without gate_w (the plain FFN has no gate)")
    if width < 1:
        raise ValueError(f"sparse_ffn_train: width must be >= 1; got {width}")


class SparseFFNTrainFn(torch.autograd.Function):
    """autograd.Function of the sparse FFN + L1 term; see the module docstring for the math and what is saved."""

    @staticmethod
    def forward(ctx, x, gate_w, up_w, down_w, gate_b, up_b, down_b, width):
        gated = gate_w is not None
        n_rows = x.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)  # the L1 sum's dtype (layer_l1 sums in fp32)
        with torch.autocast(x.device.type, enabled=False):
            a = F.linear(x, gate_w if gated else up_w, gate_b if gated else up_b).relu_()  # (M, H) dense, not kept
            hy = pack_hybrid(a, width)  # P = {a != 0} = {a > 0} after ReLU (NaN counts as active)
            del a
            m, j, s = _ell_pairs(hy)  # (N,) row-major live slots
            tail_rows, g_tail = hy.tail_rows, hy.tail  # (R,), (R, H)
            on_tail = g_tail != 0  # (R, H): P on the tail rows
            x_tail = x.index_select(0, tail_rows)  # (R, D)
            if gated:
                u_ell = torch.zeros_like(hy.values)  # (M, W)
                u_pairs = _pair_dots(x, up_w, m, j)
                if up_b is not None:
                    u_pairs = u_pairs + up_b.index_select(0, j)
                u_ell.view(-1)[s] = u_pairs
                u_tail = torch.where(on_tail, F.linear(x_tail, up_w, up_b), 0)  # (R, H), zero off P
                h_ell, h_tail = hy.values * u_ell, g_tail * u_tail
            else:
                u_ell = u_tail = None
                h_ell, h_tail = hy.values, g_tail
            down_t = down_w.t().contiguous()  # (H, D): neuron j's Down column as a row
            out = torch.zeros(n_rows, down_w.shape[0], dtype=x.dtype, device=x.device)  # (M, D)
            _scatter_pairs(out, m, down_t, j, h_ell.view(-1)[s])
            out.index_copy_(0, tail_rows, F.linear(h_tail, down_w))  # tail rows own no ELL slot
            if down_b is not None:
                out += down_b
            l1 = (h_ell.to(acc).abs().sum() + h_tail.to(acc).abs().sum()) / n_rows
            nz_ell, nz_tail = h_ell != 0, h_tail != 0
            token_counts = nz_ell.sum(1)  # (M,) int64; tail rows' ELL slots are padding (0)
            token_counts.index_copy_(0, tail_rows, nz_tail.sum(1))
            neuron_counts = torch.bincount(j[nz_ell.view(-1)[s]], minlength=up_w.shape[0]) + nz_tail.sum(0)

        ctx.gated, ctx.width, ctx.n_cols, ctx.acc = gated, width, up_w.shape[0], acc
        ctx.has_bias = (gate_b is not None, up_b is not None, down_b is not None)
        ctx.save_for_backward(x, gate_w, up_w, down_w, hy.values, hy.cols, hy.counts, tail_rows, g_tail, u_ell, u_tail)
        ctx.mark_non_differentiable(token_counts, neuron_counts)
        return out, l1, token_counts, neuron_counts

    @staticmethod
    def backward(ctx, gy, gl1, _g_tc, _g_nc):
        x, gate_w, up_w, down_w, g_ell, cols, counts, tail_rows, g_tail, u_ell, u_tail = ctx.saved_tensors
        need = ctx.needs_input_grad  # (x, gate_w, up_w, down_w, gate_b, up_b, down_b, width)
        gated = ctx.gated
        n_rows = x.shape[0]
        hy = HybridELL(values=g_ell, cols=cols, counts=counts, tail_rows=tail_rows, tail=g_tail, n_cols=ctx.n_cols)
        with torch.autocast(x.device.type, enabled=False):
            gy = gy.contiguous()
            c = (gl1.to(ctx.acc) / n_rows).to(x.dtype)  # ∂l1/∂|h_mj| = 1/M
            h_ell = g_ell * u_ell if gated else g_ell  # (M, W)
            h_tail = g_tail * u_tail if gated else g_tail  # (R, H)
            down_t = down_w.t().contiguous()  # (H, D)
            gy_tail, x_tail = gy.index_select(0, tail_rows), x.index_select(0, tail_rows)  # (R, D)
            on_tail = g_tail != 0

            # dh on P: the ELL pairs (gathers of Downᵀ rows) and the tail rows (one dense product, masked).
            m, j, s = _ell_pairs(hy)
            dh_ell = torch.zeros_like(g_ell)  # (M, W), same layout as g_ell/u_ell
            dh_ell.view(-1)[s] = _pair_dots(gy, down_t, m, j) + c * torch.sign(h_ell.view(-1)[s])
            dh_tail = torch.where(on_tail, F.linear(gy_tail, down_t) + c * torch.sign(h_tail), 0)  # (R, H)
            if gated:
                dg_ell, du_ell = dh_ell * u_ell, dh_ell * g_ell
                dg_tail, du_tail = dh_tail * u_tail, dh_tail * g_tail
            else:  # plain: the activation is the up projection; da = dh on P
                dg_ell = dg_tail = None
                du_ell, du_tail = dh_ell, dh_tail
            # (weight, its gradient per pair in the (M, W) layout, on the tail rows), for the products with x
            branches = [(gate_w, dg_ell, dg_tail, 1, 4)] if gated else []
            branches.append((up_w, du_ell, du_tail, 2, 5))

            dx = None
            if need[0]:  # token-major: each token sums over its own pairs
                dx = torch.zeros_like(x)  # (M, D)
                tail_dx = torch.zeros_like(x_tail)  # (R, D)
                for w, d_ell, d_tail, _, _ in branches:
                    _scatter_pairs(dx, m, w, j, d_ell.view(-1)[s])
                    tail_dx += d_tail @ w
                dx.index_add_(0, tail_rows, tail_dx)

            # neuron-major (CSC order): each neuron sums over the tokens where it is active
            mt, jt, st = _ell_pairs_neuron_major(hy)
            grads = [None] * 8
            grads[0] = dx
            if need[3]:
                d_down_t = torch.zeros_like(down_t)  # (H, D)
                _scatter_pairs(d_down_t, jt, gy, mt, h_ell.view(-1)[st])
                d_down_t += h_tail.t() @ gy_tail
                grads[3] = d_down_t.t().contiguous()  # (D, H)
            for w, d_ell, d_tail, wi, bi in branches:
                d_pairs = d_ell.view(-1)[st]
                if need[wi]:
                    dw = torch.zeros_like(w)  # (H, D)
                    _scatter_pairs(dw, jt, x, mt, d_pairs)
                    dw += d_tail.t() @ x_tail
                    grads[wi] = dw
                if need[bi] and ctx.has_bias[bi - 4]:
                    db = torch.zeros(ctx.n_cols, dtype=x.dtype, device=x.device).index_add_(0, jt, d_pairs)
                    grads[bi] = db + d_tail.sum(0)
            if need[6] and ctx.has_bias[2]:
                grads[6] = gy.sum(0)
        return tuple(grads)


def sparse_ffn_train_reference(x: Tensor, gate_w: Optional[Tensor], up_w: Tensor, down_w: Tensor,
                               gate_b: Optional[Tensor] = None, up_b: Optional[Tensor] = None,
                               down_b: Optional[Tensor] = None, width: int = DEFAULT_WIDTH,
                               hot=None) -> SparseFFNTrainOut:
    """The pure-torch op (CPU or GPU). Shapes and math: module docstring. gate_w=None: the plain FFN.

    hot (which neurons a backend computes densely) is a speed hint of the CUDA op; the math, and so this
    reference, does not depend on it.
    """
    _check(x, gate_w, up_w, down_w, gate_b, up_b, down_b, width)
    return SparseFFNTrainOut(*SparseFFNTrainFn.apply(x, gate_w, up_w, down_w, gate_b, up_b, down_b, width))


# The implementations the model can use, picked by name at the model's one call site (model/ffn.py). Modules that
# need a GPU stack register themselves when imported; _LAZY_BACKENDS says which module registers which name, so
# importing this module never loads CuPy.
TRAIN_BACKENDS: dict[str, Callable[..., SparseFFNTrainOut]] = {"torch": sparse_ffn_train_reference}
_LAZY_BACKENDS = {"cuda": "sparsify_cli.kernels.train_cuda"}  # bf16 CUDA kernels (kernels_cu/train_ffn.cu)
DEFAULT_TRAIN_BACKEND = "torch"


def train_backend(name: str) -> Callable[..., SparseFFNTrainOut]:
    """The implementation registered as `name` (importing its module if needed)."""
    if name not in TRAIN_BACKENDS and name in _LAZY_BACKENDS:
        import importlib

        importlib.import_module(_LAZY_BACKENDS[name])
    if name not in TRAIN_BACKENDS:
        choices = sorted(set(TRAIN_BACKENDS) | set(_LAZY_BACKENDS))
        raise ValueError(f"sparse_ffn_train backend {name!r} is not available; choose one of {choices}")
    return TRAIN_BACKENDS[name]


def sparse_ffn_train(x: Tensor, gate_w: Optional[Tensor], up_w: Tensor, down_w: Tensor,
                     gate_b: Optional[Tensor] = None, up_b: Optional[Tensor] = None, down_b: Optional[Tensor] = None,
                     width: int = DEFAULT_WIDTH, backend: Optional[str] = None,
                     hot=None) -> SparseFFNTrainOut:
    """The sparse training FFN the model calls: x (M, D) -> (out (M, D), l1 (), token_counts (M,), neuron_counts (H,)).

    gate_w (H, D) or None (plain FFN), up_w (H, D), down_w (D, H), biases optional; all in x's dtype and device.
    backend: "torch" (the reference, CPU or GPU) or "cuda" (bf16 kernels; train_cuda.py); default DEFAULT_TRAIN_BACKEND.
    hot: optional, the neurons the CUDA op computes with dense GEMMs (a speed hint; same result): an (H,) bool mask
    on the device or a train_cuda.HotSet (the same, known on the host).
    """
    return train_backend(backend or DEFAULT_TRAIN_BACKEND)(x, gate_w, up_w, down_w, gate_b, up_b, down_b, width,
                                                          hot=hot)
