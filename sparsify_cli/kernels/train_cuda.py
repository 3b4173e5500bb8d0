"""The sparse FFN training op on the GPU: kernels_cu/train_ffn.cu behind the same interface as the reference.

    sparse_ffn_train_cuda(x, gate_w, up_w, down_w, gate_b, up_b, down_b, width) -> SparseFFNTrainOut
      bf16 CUDA tensors, nn.Linear layouts (train_reference.py's docstring has the math); registered as
      TRAIN_BACKENDS["cuda"] (the model picks it by name).

How the work is split (docs/TRAINING_KERNELS.md §6 has the details and the measurements):
  forward   cuBLAS gate GEMM a = x·Gᵀ + gb (M, H), not kept  →  train_pattern_kernel: relu + ELL of width W over
            the cold neurons (rows with more than W: the dense tail)  →  train_plan_kernel (tail rows, hot neurons,
            sizes)  →  train_fwd_kernel on the ELL rows (u, h, out, |h| and non-zero counts)  →  the hot neurons
            (`hot`: the busiest, from the previous call) by cuBLAS over their columns + train_hot_fwd_kernel  →  the
            tail rows by cuBLAS on those R rows, masked by the pattern.
  backward  hot: cuBLAS + train_hot_bwd_kernel  →  train_bwd_token_kernel (dh per slot, dg, du, dX)  →  a stable
            sort of the live slots by neuron (CSC order, tokens ascending within a neuron) and
            train_chunks_kernel  →  train_bwd_neuron_kernel (dDown, dG, dU; long segments split into chunks summed
            in order by train_reduce_kernel: deterministic)  →  the tail rows by cuBLAS.
Every row is exact whatever the sparsity: rows above W are computed densely, never dropped or capped.

One host wait per forward, for the sizes of the tail, the hot set and the backward's chunks: train_plan_kernel
computes them after the pattern, they are copied to pinned memory behind an event, and the host waits on that
event only after queueing the cold forward kernel (so the GPU stays busy); none in backward. The op is not
CUDA-graph capturable. Saved for backward: what the reference saves (no (M, H) tensor), plus, with a hot set,
the hot neurons' gate and up values (M, Hp) and the per-neuron ELL counts (H,).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify_cli.kernels import loader
from sparsify_cli.kernels.train_reference import TRAIN_BACKENDS, SparseFFNTrainOut, _check

SOURCE = "train_ffn.cu"
TRAIN_WARPS = 4  # warps (= tokens) per block of the token-major kernels; must match kernels_cu/train_ffn.cu
MAX_WIDTH = 512  # TRAIN_MAX_WIDTH in kernels_cu/train_ffn.cu (per-warp shared-memory lists)
NEURON_THREADS = 256  # NEURON_THREADS in kernels_cu/train_ffn.cu: 8 columns each
NEURON_COLS = NEURON_THREADS * 8  # columns per neuron-pass block
PLAN_THREADS = 1024  # PLAN_THREADS in kernels_cu/train_ffn.cu (the one-block bookkeeping kernels)
NEURON_CHUNK = 128  # tokens per neuron-pass block; longer neuron segments are split (and summed in order)
# A neuron firing on more than this share of tokens goes through dense GEMMs over its column (8 GEMM-columns of
# work) instead of per-pair gathers (~6 ns per pair on an H100 at D = 2048: break-even ~0.7% by that count).
# Measured (BENCHMARKS.md, training FFN, M 16384): 0.5% beat 1% at nnz 29/56/112 (1.76/1.60/1.59x vs
# 1.54/1.43/1.56x), 1% was better at nnz 225. Any value gives the same result; only the speed changes.
HOT_RATE = 0.005
HOT_ALIGN = 64  # the hot GEMMs' width is padded to a multiple of this


def _nv(d: int) -> int:
    """16-byte vectors per lane of a token-major kernel's D-chunk (4: D <= 1024, else 8 with chunks)."""
    return 4 if d <= 1024 else 8


def _i32(v: int):
    import numpy as np

    return np.int32(v)


def _i64(v: int):
    import numpy as np

    return np.int64(v)


def _f32(v: float):
    import numpy as np

    return np.float32(v)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def check_cuda_args(x: Tensor, gate_w: Optional[Tensor], up_w: Tensor, down_w: Tensor, width: int) -> None:
    """What the kernels need beyond the reference's checks (which run first): one line per problem."""
    if x.device.type != "cuda":
        raise ValueError(f"sparse_ffn_train (cuda): x must be a CUDA tensor; got {x.device}")
    if x.dtype != torch.bfloat16:
        raise ValueError(f"sparse_ffn_train (cuda): the kernels take bf16; got {x.dtype} (use backend 'torch')")
    d = x.shape[1]
    if d % 8:
        raise ValueError(f"sparse_ffn_train (cuda): D={d} must be a multiple of 8 (16-byte rows)")
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"sparse_ffn_train (cuda): width={width} must be in [1, {MAX_WIDTH}]")
    if x.shape[0] * width >= 2**31:
        raise ValueError(f"sparse_ffn_train (cuda): M·W = {x.shape[0] * width} slots exceed int32 indexing")


def _fn(expr: str):
    return loader.get_function(SOURCE, expr)


def _b(v: bool) -> str:
    return "true" if v else "false"


def _padded(idx: Tensor) -> Tensor:
    """idx extended to a multiple of HOT_ALIGN entries by repeating its first one (the caller zeroes those
    columns): cuBLAS picks its fast kernels only for aligned widths (an odd one fell back to sm75 kernels, ~6x
    slower, on the H100)."""
    n = idx.numel()
    pad = -n % HOT_ALIGN
    if n == 0 or pad == 0:
        return idx
    return torch.cat([idx, idx[:1].expand(pad)])


def transpose(t: Tensor) -> Tensor:
    """(rows, cols) bf16 -> (cols, rows) contiguous, by transpose_bf16_kernel (torch's strided copy is ~5x slower)."""
    if t.dtype != torch.bfloat16 or t.dim() != 2:
        raise ValueError(f"transpose: expects a 2-D bf16 tensor; got {t.dtype} {tuple(t.shape)}")
    rows, cols = t.shape
    src = t.contiguous()
    out = torch.empty(cols, rows, dtype=t.dtype, device=t.device)
    if t.numel():
        loader.launch(_fn("transpose_bf16_kernel"), ((cols + 31) // 32, (rows + 31) // 32), (32, 8),
                      (src.data_ptr(), out.data_ptr(), _i32(rows), _i32(cols)))
    return out


def _hot_forward(x, a, up_w, up_b, down_t, hot_cols, n_hot, gated, out, l1_tok, tok_cnt, neuron_cnt):
    """The hot neurons' part of the forward: dense GEMMs over their (padded) columns, masked by the pattern, added
    onto out, their |h| and counts onto the per-token and per-neuron sums. Returns (g_hot, u_hot) for backward."""
    m = x.shape[0]
    g_hot = a.index_select(1, hot_cols)  # (M, Hp): hot gate pre-activations (relu'd by train_hot_fwd_kernel)
    u_hot = None
    if n_hot:
        hp = hot_cols.numel()
        if gated:
            u_hot = F.linear(x, up_w.index_select(0, hot_cols),
                             None if up_b is None else up_b.index_select(0, hot_cols)).contiguous()
        h_hot = torch.empty(m, hp, dtype=torch.bfloat16, device=x.device) if gated else g_hot
        loader.launch(_fn(f"train_hot_fwd_kernel<{_b(gated)}>"), ((m + TRAIN_WARPS - 1) // TRAIN_WARPS,),
                      (32 * TRAIN_WARPS,),
                      (g_hot.data_ptr(), _ptr(u_hot), _ptr(h_hot if gated else None), hot_cols.data_ptr(),
                       l1_tok.data_ptr(), tok_cnt.data_ptr(), neuron_cnt.data_ptr(), _i64(m), _i32(hp), _i32(n_hot)))
        out.addmm_(h_hot, down_t.index_select(0, hot_cols))  # out += h_hot · Down_hotᵀ
    return g_hot, u_hot


@dataclass(frozen=True, eq=False)
class HotSet:
    """A hot set known on the host, so the forward can queue the hot neurons' GEMMs before its one host wait
    (were their indices found on the device, the GPU would idle while the host queued them after the wait; a
    bare (H,) device mask given to the op is converted here, at the cost of one sync). Device tensors: ``skip`` (H rounded up to 256,) uint8 (the pattern
    kernel's mask), ``idx`` (n,) int64 ascending, ``cols`` = idx padded to a multiple of HOT_ALIGN (_padded)."""

    skip: Tensor
    idx: Tensor
    cols: Tensor
    n: int
    h: int  # neurons

    @property
    def mask(self) -> Tensor:
        """(H,) bool on the device."""
        return self.skip[: self.h].bool()

    @classmethod
    def from_mask_host(cls, mask: Tensor, device: torch.device | str) -> "HotSet":
        """From an (H,) bool mask on the CPU: every tensor is built there and copied without a sync."""
        if mask.device.type != "cpu" or mask.dtype != torch.bool or mask.dim() != 1:
            raise ValueError(f"HotSet.from_mask_host: expects an (H,) bool CPU mask; got {mask.dtype} {mask.device}")
        h = mask.numel()
        hp = (h + 255) // 256 * 256
        skip = torch.zeros(hp, dtype=torch.uint8)
        skip[:h] = mask
        idx = mask.nonzero().view(-1)
        cols = _padded(idx)
        both = torch.cat([idx, cols]).pin_memory().to(device, non_blocking=True)
        return cls(skip.pin_memory().to(device, non_blocking=True), both[: idx.numel()], both[idx.numel():],
                   idx.numel(), h)


class PendingHot:
    """The next call's hot set, from this call's neuron counts: copied to pinned host memory behind an event
    right away, resolved at the next call (by then the event is long past, so resolving waits for nothing and
    drains no queue)."""

    def __init__(self, neuron_counts: Tensor, n_tokens: int, rate: float = HOT_RATE):
        self.counts = torch.empty(neuron_counts.shape, dtype=neuron_counts.dtype, pin_memory=True)
        self.counts.copy_(neuron_counts.detach(), non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()
        self.n_tokens, self.rate, self.device = n_tokens, rate, neuron_counts.device

    def resolve(self) -> HotSet:
        self.ready.synchronize()
        return HotSet.from_mask_host(hot_mask(self.counts, self.n_tokens, self.rate), self.device)


class SparseFFNTrainCudaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate_w, up_w, down_w, gate_b, up_b, down_b, width, hot):
        gated = gate_w is not None
        m, d = x.shape
        h = up_w.shape[0]
        dev = x.device
        grid_rows = ((m + TRAIN_WARPS - 1) // TRAIN_WARPS,)
        warps = (32 * TRAIN_WARPS,)
        with torch.autocast("cuda", enabled=False):
            a = F.linear(x, gate_w if gated else up_w, gate_b if gated else up_b).contiguous()  # (M, H), not kept
            cols = torch.empty(m, width, dtype=torch.int32, device=dev)
            g = torch.empty(m, width, dtype=torch.bfloat16, device=dev)
            counts = torch.empty(m, dtype=torch.int32, device=dev)
            ints = torch.zeros(2 * h, dtype=torch.int32, device=dev)  # one memset for both counters
            hist, neuron_cnt = ints[:h], ints[h:]  # ELL entries per neuron (CSC segment sizes); h != 0 per neuron
            hs: Optional[HotSet] = hot  # hot neurons: left out of the pattern, computed by dense GEMMs below
            skip = None if hs is None else hs.skip
            vec_ok = int(h % 8 == 0 and a.data_ptr() % 16 == 0)
            loader.launch(_fn("train_pattern_kernel"), grid_rows, warps,
                          (a.data_ptr(), cols.data_ptr(), g.data_ptr(), counts.data_ptr(), hist.data_ptr(),
                           _ptr(skip), _i64(m), _i32(h), _i32(width), _i32(vec_ok)))
            # The sizes the host needs (tail rows, hot neurons, the backward's chunks): computed on the device,
            # copied to pinned memory behind an event. The host waits for that event only after queueing the
            # work that does not depend on them, so the GPU is never left idle at this point.
            idx = torch.empty(m + h, dtype=torch.int64, device=dev)  # tail rows, then the plan's hot list (unread)
            stats = torch.empty(8, dtype=torch.int64, device=dev)
            loader.launch(_fn("train_plan_kernel"), (1,), (PLAN_THREADS,),
                          (counts.data_ptr(), hist.data_ptr(), _ptr(skip), idx.data_ptr(), idx[m:].data_ptr(),
                           stats.data_ptr(), _i32(m), _i32(h), _i32(width), _i32(NEURON_CHUNK)))
            stats_host = torch.empty(8, dtype=torch.int64, pin_memory=True)
            stats_host.copy_(stats, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()

            u = torch.empty(m, width, dtype=torch.bfloat16, device=dev) if gated else None
            out = torch.empty(m, d, dtype=torch.bfloat16, device=dev)
            l1_tok = torch.empty(m, dtype=torch.float32, device=dev)
            tok_cnt = torch.empty(m, dtype=torch.int32, device=dev)
            down_t = transpose(down_w)  # (H, D): Down's column j as a row
            loader.launch(_fn(f"train_fwd_kernel<{_nv(d)}, {_b(gated)}>"), grid_rows, warps,
                          (x.data_ptr(), up_w.data_ptr(), _ptr(up_b if gated else None), down_t.data_ptr(),
                           _ptr(down_b), cols.data_ptr(), g.data_ptr(), counts.data_ptr(), _ptr(u), out.data_ptr(),
                           l1_tok.data_ptr(), tok_cnt.data_ptr(), neuron_cnt.data_ptr(), _i64(m), _i32(d),
                           _i32(width)))
            # the hot set is known on the host: its part is queued before waiting
            hot_idx = hs.idx if hs is not None else torch.empty(0, dtype=torch.int64, device=dev)
            hot_cols = hs.cols if hs is not None else hot_idx
            g_hot, u_hot = _hot_forward(x, a, up_w, up_b, down_t, hot_cols, hot_idx.numel(), gated, out, l1_tok,
                                        tok_cnt, neuron_cnt)
            ready.synchronize()  # the plan only: the kernels queued above may still be running
            r, n_live, n_total, n_split_chunks, n_split, n_hot = stats_host.tolist()[:6]
            tail_rows = idx[:r]  # ascending
            if n_hot != hot_idx.numel():  # the plan's own count of the skipped neurons cross-checks the host's
                raise RuntimeError(f"sparse_ffn_train (cuda): the plan counted {n_hot} hot neurons, the host "
                                   f"{hot_idx.numel()}: internal error")

            g_tail = a.index_select(0, tail_rows).relu_()  # (R, H)
            if n_hot:
                g_tail.masked_fill_(hs.mask, 0)  # the tail covers the cold neurons only
            del a
            u_tail = None
            if r:  # the rows above W, whole and dense, masked by the pattern (their ELL slots are padding)
                x_t = x.index_select(0, tail_rows)
                on = g_tail != 0
                if gated:
                    u_tail = torch.where(on, F.linear(x_t, up_w, up_b), 0)
                    h_t = g_tail * u_tail
                else:
                    h_t = g_tail
                out.index_add_(0, tail_rows, F.linear(h_t, down_w))  # onto db and the hot part
                l1_tok.index_add_(0, tail_rows, h_t.float().abs().sum(1))
                nz = h_t != 0
                tok_cnt.index_add_(0, tail_rows, nz.sum(1, dtype=torch.int32))
                neuron_cnt += nz.sum(0, dtype=torch.int32)
            l1 = l1_tok.sum() / m

        ctx.gated, ctx.width, ctx.has_bias = gated, width, (gate_b is not None, up_b is not None, down_b is not None)
        ctx.sizes = (n_live, n_total, n_split_chunks, n_split)
        ctx.save_for_backward(x, gate_w, up_w, down_w, g, cols, counts, u, tail_rows, g_tail, u_tail, hist, hot_idx,
                              g_hot, u_hot)
        token_counts, neuron_counts = tok_cnt.long(), neuron_cnt.long()
        ctx.mark_non_differentiable(token_counts, neuron_counts)
        return out, l1, token_counts, neuron_counts

    @staticmethod
    def backward(ctx, gy, gl1, _g_tc, _g_nc):
        (x, gate_w, up_w, down_w, g, cols, counts, u, tail_rows, g_tail, u_tail, seg, hot_idx, g_hot,
         u_hot) = ctx.saved_tensors
        gated, width = ctx.gated, ctx.width
        n_live, n_total, n_split_chunks, n_split = ctx.sizes
        need = ctx.needs_input_grad
        m, d = x.shape
        h = up_w.shape[0]
        dev = x.device
        with torch.autocast("cuda", enabled=False):
            gy = torch.zeros_like(x) if gy is None else gy.to(torch.bfloat16).contiguous()
            gl1_f = None if gl1 is None else gl1.detach().to(torch.float32).reshape(1).contiguous()
            down_t = transpose(down_w)
            dg = torch.empty(m, width, dtype=torch.float32, device=dev) if gated else None
            du = torch.empty(m, width, dtype=torch.float32, device=dev)
            dx = torch.empty_like(x)
            grid_rows = ((m + TRAIN_WARPS - 1) // TRAIN_WARPS,)
            n_hot = hot_idx.numel()
            hot_cols = _padded(hot_idx)
            dx_hot = dg_hot = du_hot = None
            if n_hot:  # hot neurons: dense GEMMs over their (padded) columns, masked by the pattern
                hp = hot_cols.numel()
                dh_raw = gy @ down_t.index_select(0, hot_cols).t()  # (M, Hp)
                dgdu = torch.empty(m, 2 * hp if gated else hp, dtype=torch.bfloat16, device=dev)  # [dg | du]
                h_hot = torch.empty(m, hp, dtype=torch.bfloat16, device=dev) if gated else g_hot
                loader.launch(_fn(f"train_hot_bwd_kernel<{_b(gated)}>"), grid_rows, (32 * TRAIN_WARPS,),
                              (g_hot.data_ptr(), _ptr(u_hot), dh_raw.data_ptr(), _ptr(gl1_f), _f32(1.0 / m),
                               dgdu.data_ptr(), _ptr(h_hot if gated else None), _i64(m), _i32(hp)))
                del dh_raw
                if gated:
                    dg_hot, du_hot = dgdu[:, :hp], dgdu[:, hp:]
                    w_hot = torch.cat([gate_w.index_select(0, hot_cols), up_w.index_select(0, hot_cols)])  # (2Hp, D)
                else:
                    du_hot, w_hot = dgdu, up_w.index_select(0, hot_cols)
                dx_hot = dgdu @ w_hot  # (M, D): both branches in one GEMM
            loader.launch(_fn(f"train_bwd_token_kernel<{_nv(d)}, {_b(gated)}>"), grid_rows, (32 * TRAIN_WARPS,),
                          (gy.data_ptr(), down_t.data_ptr(), _ptr(gate_w), up_w.data_ptr(), cols.data_ptr(),
                           g.data_ptr(), _ptr(u), counts.data_ptr(), _ptr(dg), du.data_ptr(), _ptr(dx_hot),
                           dx.data_ptr(), _ptr(gl1_f), _f32(1.0 / m), _i64(m), _i32(d), _i32(width)))

            # CSC order of the live ELL slots: a stable sort by neuron keeps tokens ascending within a neuron;
            # padding (-1) sorts last as key H. No host sync: the sizes came from the forward.
            flat = cols.view(-1)
            keys = torch.where(flat >= 0, flat, h).to(torch.int16 if h < 2**15 - 1 else torch.int32)
            keys_sorted, order = torch.sort(keys, stable=True)
            perm64 = order[:n_live]
            perm = perm64.to(torch.int32)
            chunks = torch.empty(4, max(n_total, 1), dtype=torch.int32, device=dev)  # neuron, beg, end, part
            reduce = torch.empty(3, max(n_split, 1), dtype=torch.int32, device=dev)  # neuron, first part, parts
            loader.launch(_fn("train_chunks_kernel"), (1,), (PLAN_THREADS,),
                          (seg.data_ptr(), _i32(h), _i32(NEURON_CHUNK), *(chunks[i].data_ptr() for i in range(4)),
                           *(reduce[i].data_ptr() for i in range(3))))

            has_tail = tail_rows.numel() > 0
            out_dtype = torch.float32 if has_tail else torch.bfloat16  # the tail is added before rounding
            d_down_t = torch.empty(h, d, dtype=out_dtype, device=dev)
            d_gate = torch.empty(h, d, dtype=out_dtype, device=dev) if gated else None
            d_up = torch.empty(h, d, dtype=out_dtype, device=dev)
            scratch = torch.empty(max(n_split_chunks, 1), 3, d, dtype=torch.float32, device=dev)
            out_t = "float" if has_tail else "unsigned short"
            ycols = (d + NEURON_COLS - 1) // NEURON_COLS
            loader.launch(_fn(f"train_bwd_neuron_kernel<{_b(gated)}, {out_t}>"), (n_total, ycols),
                          (NEURON_THREADS,),
                          (perm.data_ptr(), *(chunks[i].data_ptr() for i in range(4)), x.data_ptr(), gy.data_ptr(),
                           g.data_ptr(), _ptr(u), _ptr(dg), du.data_ptr(), d_down_t.data_ptr(), _ptr(d_gate),
                           d_up.data_ptr(), scratch.data_ptr(), _i32(d), _i32(width)))
            if n_split:
                loader.launch(_fn(f"train_reduce_kernel<{_b(gated)}, {out_t}>"), (n_split, ycols),
                              (NEURON_THREADS,),
                              (*(reduce[i].data_ptr() for i in range(3)), scratch.data_ptr(), d_down_t.data_ptr(),
                               _ptr(d_gate), d_up.data_ptr(), _i32(d)))
            if n_hot:  # the hot rows of the weight gradients (their CSC segments are empty: written as zeros)
                d_down_t.index_copy_(0, hot_idx, (h_hot.t() @ gy)[:n_hot].to(out_dtype))
                dgu = dgdu.t() @ x  # (2Hp, D) gated: dG_hot rows then dU_hot rows, one GEMM; plain (Hp, D): dU_hot
                if gated:
                    d_gate.index_copy_(0, hot_idx, dgu[:n_hot].to(out_dtype))
                    d_up.index_copy_(0, hot_idx, dgu[hp:hp + n_hot].to(out_dtype))
                else:
                    d_up.index_copy_(0, hot_idx, dgu[:n_hot].to(out_dtype))
                del dgu

            dg_tail = du_tail = None
            if has_tail:  # the rows above W: dense products over those R rows, masked by the pattern
                gy_t, x_t = gy.index_select(0, tail_rows), x.index_select(0, tail_rows)
                on = g_tail != 0
                h_t = g_tail * u_tail if gated else g_tail
                c = torch.zeros((), dtype=torch.bfloat16, device=dev) if gl1_f is None else (gl1_f[0] / m).to(
                    torch.bfloat16)  # dl1/d|h| times the incoming gradient
                dh_t = torch.where(on, gy_t @ down_w + c * torch.sign(h_t), 0)  # (R, H)
                if gated:
                    dg_tail, du_tail = dh_t * u_tail, dh_t * g_tail
                    dx_t = dg_tail @ gate_w + du_tail @ up_w
                    d_gate += (dg_tail.t() @ x_t).float()
                else:
                    du_tail = dh_t
                    dx_t = du_tail @ up_w
                if dx_hot is not None:
                    dx_t += dx_hot.index_select(0, tail_rows)
                dx.index_copy_(0, tail_rows, dx_t)
                d_up += (du_tail.t() @ x_t).float()
                d_down_t += (h_t.t() @ gy_t).float()
                d_down_t, d_up = d_down_t.to(torch.bfloat16), d_up.to(torch.bfloat16)
                d_gate = None if d_gate is None else d_gate.to(torch.bfloat16)

            grads = [None] * 9
            grads[0] = dx if need[0] else None
            grads[1] = d_gate if need[1] else None
            grads[2] = d_up if need[2] else None
            grads[3] = transpose(d_down_t) if need[3] else None  # (D, H)

            def bias_grad(per_slot: Optional[Tensor], per_tail: Optional[Tensor], per_hot: Optional[Tensor]) -> Tensor:
                acc = torch.zeros(h, dtype=torch.float32, device=dev)
                acc.index_add_(0, keys_sorted[:n_live].long(), per_slot.view(-1).index_select(0, perm64))
                if per_tail is not None:
                    acc += per_tail.float().sum(0)
                if per_hot is not None:
                    acc.index_add_(0, hot_idx, per_hot.float().sum(0)[:n_hot])
                return acc.to(torch.bfloat16)

            if ctx.has_bias[0] and need[4]:
                grads[4] = bias_grad(dg, dg_tail, dg_hot)
            if ctx.has_bias[1] and need[5]:
                grads[5] = bias_grad(du, du_tail, du_hot)
            if ctx.has_bias[2] and need[6]:
                grads[6] = gy.float().sum(0).to(torch.bfloat16)
        return tuple(grads)


def sparse_ffn_train_cuda(x: Tensor, gate_w: Optional[Tensor], up_w: Tensor, down_w: Tensor,
                          gate_b: Optional[Tensor] = None, up_b: Optional[Tensor] = None,
                          down_b: Optional[Tensor] = None, width: int = 128,
                          hot: Union[Tensor, HotSet, None] = None) -> SparseFFNTrainOut:
    """The CUDA op (bf16, one GPU). Same signature, outputs and semantics as sparse_ffn_train_reference.

    hot: optional, the neurons to compute with dense GEMMs over their columns instead of per pair (the busiest
    ones; hot_mask() picks them from the previous call's neuron_counts): an (H,) bool mask on the device, or a
    HotSet (the same, known on the host: faster, see HotSet). Same result either way.
    """
    _check(x, gate_w, up_w, down_w, gate_b, up_b, down_b, width)
    check_cuda_args(x, gate_w, up_w, down_w, width)
    h = up_w.shape[0]
    if isinstance(hot, HotSet):
        if hot.h != h or hot.skip.device != x.device:
            raise ValueError(f"sparse_ffn_train (cuda): the HotSet is for {hot.h} neurons on {hot.skip.device}; "
                             f"the layer has {h} on {x.device}")
    elif hot is not None:
        if hot.dtype != torch.bool or tuple(hot.shape) != (h,) or hot.device != x.device:
            raise ValueError(f"sparse_ffn_train (cuda): hot must be a bool ({h},) mask on {x.device}")
        hot = HotSet.from_mask_host(hot.cpu(), x.device)  # one sync: a training layer passes a HotSet instead
    args = [t if t is None else t.contiguous() for t in (x, gate_w, up_w, down_w, gate_b, up_b, down_b)]
    return SparseFFNTrainOut(*SparseFFNTrainCudaFn.apply(*args, width, hot))


def hot_mask(neuron_counts: Tensor, n_tokens: int, rate: float = HOT_RATE) -> Tensor:
    """(H,) bool: neurons active on more than `rate` of the tokens (from a previous call's neuron_counts)."""
    return neuron_counts > rate * n_tokens


TRAIN_BACKENDS["cuda"] = sparse_ffn_train_cuda
