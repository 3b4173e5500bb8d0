"""Hybrid ELL + dense tail (training) and its neuron-major transpose (backward); reference semantics.

    a: (M, H) ──pack_hybrid──► HybridELL
        values (M, W)  activation dtype, exact; padding 0
        cols   (M, W)  int32 column of each entry, ascending; padding -1
        counts (M,)    int32 TRUE non-zeros per row
        rows with count > W go WHOLE to the dense tail (their ELL slots stay padding):
        tail_rows (R,) int64 ascending, tail (R, H) activation dtype
    HybridELL ──transpose_hybrid──► HybridT: CSC over tokens, one segment per neuron, with `src` pointing back
        to where each entry lives in the row-major HybridELL (so a backward kernel can read a gradient computed in
        the row-major layout in neuron order).

Overflow is never silent: a row either fits in the ELL part or sits whole in the tail, and R is a property.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_WIDTH = 128
COL_PAD = -1


def _check_activation(a: Tensor, where: str) -> None:
    if a.dim() != 2:
        raise ValueError(f"{where} expects a 2-D activation tensor (M, H); got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise ValueError(f"{where} expects a floating-point tensor; got {a.dtype}")
    if a.shape[1] < 1 or a.shape[1] >= 2**31:
        raise ValueError(f"{where} needs 1 <= H < 2**31 columns (int32 indices); got H={a.shape[1]}")


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class HybridELL:
    """Row-major activations: ELL of width W for rows with <= W non-zeros, the other rows whole in a dense tail."""

    values: Tensor  # (M, W) activation dtype; padding 0
    cols: Tensor  # (M, W) int32; padding -1
    counts: Tensor  # (M,) int32, true count
    tail_rows: Tensor  # (R,) int64, ascending
    tail: Tensor  # (R, H) activation dtype
    n_cols: int  # H

    def __post_init__(self) -> None:
        m, w = self.values.shape
        if self.cols.shape != (m, w) or self.cols.dtype != torch.int32:
            raise ValueError(f"HybridELL.cols must be int32 {(m, w)}; got {self.cols.dtype} {tuple(self.cols.shape)}")
        if self.counts.shape != (m,) or self.counts.dtype != torch.int32:
            raise ValueError(f"HybridELL.counts must be int32 ({m},); got {self.counts.dtype} {tuple(self.counts.shape)}")
        r = self.tail_rows.shape[0]
        if self.tail.shape != (r, self.n_cols) or self.tail_rows.dtype != torch.int64:
            raise ValueError(f"HybridELL.tail must be ({r}, {self.n_cols}) with int64 tail_rows; got {tuple(self.tail.shape)}")

    @property
    def n_rows(self) -> int:
        return self.values.shape[0]

    @property
    def width(self) -> int:
        return self.values.shape[1]

    @property
    def in_tail(self) -> Tensor:
        """bool (M,): rows stored whole in the dense tail (count > W)."""
        return self.counts > self.width

    @property
    def n_tail_rows(self) -> int:
        """R: rows that did not fit in the ELL part."""
        return self.tail_rows.shape[0]

    @property
    def nnz(self) -> int:
        return int(self.counts.sum())


def pack_hybrid(a: Tensor, width: int = DEFAULT_WIDTH) -> HybridELL:
    """Pack a (M, H) into ELL of `width` per row plus a dense tail for rows with more than `width` non-zeros.

    Non-zero means a != 0 (NaN counts). Values keep a's dtype (exact).
    """
    _check_activation(a, "pack_hybrid")
    if width < 1:
        raise ValueError(f"pack_hybrid width must be >= 1; got {width}")
    n_rows, n_cols = a.shape
    dev = a.device
    m, j = a.nonzero(as_tuple=True)  # (N,), (N,): a != 0 (NaN in, -0.0 out), row-major, ascending columns
    counts = torch.bincount(m, minlength=n_rows)  # (M,)
    starts = torch.cumsum(counts, 0) - counts  # (M,)
    rank = torch.arange(m.numel(), device=dev) - starts[m]  # (N,) position within the row
    in_tail = counts > width  # (M,)
    keep = ~in_tail[m]
    m, j, rank = m[keep], j[keep], rank[keep]
    values = torch.zeros(n_rows, width, dtype=a.dtype, device=dev)  # (M, W)
    cols = torch.full((n_rows, width), COL_PAD, dtype=torch.int32, device=dev)  # (M, W)
    values[m, rank] = a[m, j]
    cols[m, rank] = j.to(torch.int32)
    tail_rows = in_tail.nonzero().squeeze(1)  # (R,)
    return HybridELL(
        values=values, cols=cols, counts=counts.to(torch.int32), tail_rows=tail_rows, tail=a.index_select(0, tail_rows),
        n_cols=n_cols,
    )


def hybrid_entries(hy: HybridELL) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All non-zeros of a HybridELL, ELL part then tail part: (rows, cols, values, src), int64/int64/dtype/int64.

    src indexes the concatenation [hy.values.view(-1), hy.tail.view(-1)]: m * W + k for ELL slot (m, k),
    M * W + r * H + j for tail entry (r, j).
    """
    n_rows, width = hy.values.shape
    live = (torch.arange(width, device=hy.values.device) < hy.counts.unsqueeze(1)) & ~hy.in_tail.unsqueeze(1)
    m, k = live.nonzero(as_tuple=True)  # (N1,)
    ell_cols = hy.cols[m, k].to(torch.int64)
    r, tj = hy.tail.nonzero(as_tuple=True)  # (N2,)
    rows = torch.cat([m, hy.tail_rows[r]])
    cols = torch.cat([ell_cols, tj])
    values = torch.cat([hy.values[m, k], hy.tail[r, tj]])
    src = torch.cat([m * width + k, n_rows * width + r * hy.n_cols + tj])
    return rows, cols, values, src


def unpack_hybrid(hy: HybridELL) -> Tensor:
    """HybridELL -> (M, H) in the activation dtype; exact inverse of pack_hybrid."""
    out = torch.zeros(hy.n_rows, hy.n_cols, dtype=hy.values.dtype, device=hy.values.device)  # (M, H)
    rows, cols, values, _ = hybrid_entries(hy)
    out[rows, cols] = values
    return out


@dataclass(frozen=True, eq=False)  # holds tensors: compare fields explicitly
class HybridT:
    """Neuron-major (transposed) pattern: CSC of a (M, H), i.e. CSR of aᵀ (H, M).

    Entries of neuron j are e in [col_ptr[j], col_ptr[j+1]), tokens ascending.
    """

    col_ptr: Tensor  # (H + 1,) int64
    rows: Tensor  # (N,) int32 token index
    values: Tensor  # (N,) activation dtype
    src: Tensor  # (N,) int64 index into [hy.values.view(-1), hy.tail.view(-1)] of the HybridELL it came from
    n_rows: int  # M

    @property
    def n_cols(self) -> int:
        return self.col_ptr.shape[0] - 1

    @property
    def counts(self) -> Tensor:
        """int64 (H,): active tokens per neuron."""
        return self.col_ptr[1:] - self.col_ptr[:-1]

    @property
    def nnz(self) -> int:
        return self.rows.shape[0]


def transpose_hybrid(hy: HybridELL) -> HybridT:
    """Neuron-major form of the same non-zeros (ELL part and tail alike), for the backward pass."""
    rows, cols, values, src = hybrid_entries(hy)
    order = torch.argsort(cols * max(hy.n_rows, 1) + rows)  # by (neuron, token); keys are unique
    per_col = torch.bincount(cols, minlength=hy.n_cols)  # (H,)
    col_ptr = torch.zeros(hy.n_cols + 1, dtype=torch.int64, device=rows.device)
    col_ptr[1:] = torch.cumsum(per_col, 0)
    return HybridT(
        col_ptr=col_ptr, rows=rows[order].to(torch.int32), values=values[order], src=src[order], n_rows=hy.n_rows
    )


def unpack_hybrid_t(t: HybridT) -> Tensor:
    """HybridT -> (M, H) in the activation dtype."""
    out = torch.zeros(t.n_rows, t.n_cols, dtype=t.values.dtype, device=t.values.device)  # (M, H)
    cols = torch.repeat_interleave(torch.arange(t.n_cols, device=t.col_ptr.device), t.counts)  # (N,)
    out[t.rows.to(torch.int64), cols] = t.values
    return out
