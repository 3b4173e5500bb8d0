"""Public sparse-FFN entry points (the layer the model and the benchmarks call).

    out = ffn_forward(x, w_act, up, down_t)   # x (M, D) bf16 -> (M, D) bf16
      gated: out = (relu(x·w_actᵀ) ⊙ (x·upᵀ))·down_t        (w_act = gate weight (H, D), up (H, D))
      plain: out = relu(x·w_actᵀ)·down_t                       (w_act = up weight, up=None)
      down_t = Downᵀ (H, D), laid out once, offline.

The dense activation GEMM runs through cuBLAS (torch), or through the gemv kernel for 1-2 tokens; then either the
sparse path (sparse up/down kernels) or the dense path (two more cuBLAS GEMMs) finishes the block, chosen per call
by ``choose_sparse`` from the density (see BENCHMARKS.md for the rule's numbers). Decode of at most FUSED_MAX_M
tokens with a known density runs the fused decode kernels instead, gate projection included
(docs/INFERENCE_KERNELS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify_cli.kernels import availability
from sparsify_cli.kernels.launchers import FUSED_MAX_M

DEFAULT_TILE = 256
DEFAULT_SLOTS = 32  # compression factor C = 8 at T = 256


@dataclass(frozen=True)
class SparsePolicy:
    """When the sparse path beats dense (measured on an H100, bench_results/; BENCHMARKS.md explains).

    Sparse is chosen when the mean active neurons per token, as a fraction of H, is at most ``max_density``
    for prefill (M > decode_max_m) or ``decode_max_density`` for decode. Defaults: the largest densities at
    which the sparse path (no hybrid) took <= 0.97x dense time in the calibration sweep of
    ``python -m sparsify_cli.bench.ffn`` (D=2048, H=5632, M=16384 resp. 64): 0.0071 (the next point, 0.0085,
    ran at 1.01-1.04x; bench_results/ffn_h100.json) and, for decode since its two-kernel path from the activation,
    0.030 (1.12-1.13x in three runs; 4% ran at 1.00-1.02x: bench_results/session6/decode_sweep_*.json).
    Other GPUs: `sparsify bench --suite policy` measures the three limits there (kernels/device_policy.py), and
    packed models loaded on that GPU use them instead of these defaults.
    """

    max_density: float = 0.0075
    decode_max_density: float = 0.03
    decode_max_m: int = 64
    sample_rows: int = 256
    # Decode run eagerly (not captured in a CUDA graph, not compiled): the sparse path's host cost per call (a
    # custom op, a few CuPy launches: tens of µs) exceeds the ~18 µs its kernels save on a ~40 µs layer, and a
    # whole 28-layer model decoded at 0.79-0.84x dense that way (BENCHMARKS.md). So eager decode goes dense;
    # under a CUDA graph the sparse kernels' speed-up (2.0-2.3x fused at 1-16 tokens, BENCHMARKS.md) is kept.
    eager_decode_dense: bool = True
    # The same for a small prefill run eagerly: the hybrid block's host side is about fixed (~0.15-0.22 ms: GEMM
    # calls, CuPy launches and their checks, against ~0.07-0.10 ms for dense's three GEMMs) while the GPU time it
    # saves grows with the work, tokens x D x width. So an eager call goes dense up to this much work (multiply-adds
    # of one projection): where the two cross on the H200, D 2048, the layer packed to width 3968 (nnz 29), per call
    # (tests/gpu/host_cost.py; BENCHMARKS.md sessions 17 and 18): 1024 tokens sparse 0.179 ms vs dense 0.129
    # (0.72x), 1536 tokens 0.186 vs 0.178 (0.96x), 2048 tokens 0.182 vs 0.226 (1.24x), 4096 tokens 0.233 vs 0.440
    # (1.89x): even at ~1600 tokens. ~1130 tokens at the unpacked width 5632; ~220 on a layer of Llama 8B's size
    # (4096 x 14336). 0: never.
    eager_prefill_dense_max_work: int = 1600 * 2048 * 3968
    # Decode of at most launchers.FUSED_MAX_M tokens with a known density (nnz_hint, or mode="sparse") runs the
    # fused kernels (gate projection + relu + up dots in one pass, then the down rows): no activation round trip
    # and two launches instead of three (BENCHMARKS.md). False: gate projection, then the decode kernel.
    fused_decode: bool = True
    # The fused path's own limit: in its density sweep (H100, D 2048, H 5632, CUDA graphs; BENCHMARKS.md) it beat
    # dense at every measured point up to 6% of H (1.72x at M = 1, 1.31x at M = 8, 1.26x at M = 16), where the
    # unfused M = 64 path is 0.75x; beyond 6% was not measured, so it goes dense.
    fused_decode_max_density: float = 0.06
    # Hybrid prefill without lists (hybrid_lists False): the hot neurons' relu(a) * u in one kernel (ops.relu_mul)
    # instead of torch's two passes, which write relu(a) out and read it back (134 / 235 / 403 MB more traffic at
    # M = 65536, nnz 29 / 56 / 112).
    # H200, 4 interleaved rounds (BENCHMARKS.md, session 11): the hybrid block 0.5-5.5% faster at all 12 measured
    # shapes (-0.02 / -0.21 / -0.25 ms at 65536 tokens); the same bits as torch's two passes (GPU test).
    fused_hot_glue: bool = True
    # Hybrid prefill: one pass over the activation (relu_list.cu) computes the hot neurons' relu(a) * u and lists
    # each row's cold entries, and the sparse kernel reads those lists instead of scanning the activation with its
    # few, register-heavy warps (the scan was 0.24 of its 1.35 ms at M = 65536, nnz 29). H200 (BENCHMARKS.md,
    # session 14, same-process A/Bs): the block 0.5-6.5% faster at nnz 29 in 7 of 8 (+1.2% in the eighth), even
    # at nnz 112 (-6% to +1.5%); the same bits as the scan.
    hybrid_lists: bool = True

    def use_dense_eager(self, m: int, d_model: int, width: int) -> bool:
        """True for a call of m tokens (width d_model, width neurons) run eagerly (not captured in a CUDA graph, not
        compiled) where the sparse path's host cost loses: decode-sized (eager_decode_dense) or a small prefill
        (m * d_model * width <= eager_prefill_dense_max_work)."""
        small = m * d_model * width <= self.eager_prefill_dense_max_work
        if not (self.eager_decode_dense if m <= self.decode_max_m else small):
            return False
        return not (torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling())

    def takes_fused_decode(self, m: int, d_model: int, density_known: bool, via_twell: bool = False) -> bool:
        """Whether ffn_forward runs the fused decode kernels for m tokens of width d_model: a known density
        (nnz_hint, or mode="sparse"), at most launchers.FUSED_MAX_M tokens, d_model a multiple of 64."""
        return self.fused_decode and m <= FUSED_MAX_M and d_model % 64 == 0 and not via_twell and density_known

    def choose_sparse(self, m: int, nnz_mean: float, hidden: int, fused: bool = False) -> bool:
        """Sparse or dense for m tokens at nnz_mean active neurons per token; fused: the fused decode path runs
        (takes_fused_decode), which has its own limit."""
        density = nnz_mean / max(hidden, 1)
        if m > self.decode_max_m:
            limit = self.max_density
        else:
            limit = self.fused_decode_max_density if fused else self.decode_max_density
        return density <= limit


DEFAULT_POLICY = SparsePolicy()


def estimate_nnz(act: torch.Tensor, sample_rows: int = 256) -> float:
    """Mean active (relu > 0) neurons per token from up to ``sample_rows`` evenly spaced rows (one host sync)."""
    m = act.shape[0]
    step = max(1, m // sample_rows)
    sample = act[::step][:sample_rows]
    return float((sample > 0).sum(dtype=torch.int64).item()) / max(sample.shape[0], 1)


def dense_ffn(x: torch.Tensor, w_act: torch.Tensor, up: torch.Tensor | None, down_t: torch.Tensor,
              act: torch.Tensor | None = None, down: torch.Tensor | None = None) -> torch.Tensor:
    """The plain torch path (cuBLAS on GPU, also the CPU path); reuses ``act`` = x·w_actᵀ when given.

    ``down`` (D, H), if the caller keeps it, runs the last GEMM in nn.Linear's layout: on the H100 cuBLAS was
    up to ~13% slower on that GEMM with DownT (H, D) (BENCHMARKS.md), which costs the dense fallback ~3%.
    """
    if act is None:
        act = x @ w_act.T
    h = torch.relu(act)
    if up is not None:
        h = h * (x @ up.T)
    return torch.nn.functional.linear(h, down) if down is not None else h @ down_t


def hot_first_order(rates: torch.Tensor, threshold: float = 0.016, multiple: int = 128) -> tuple[torch.Tensor, int]:
    """Neuron order for the hybrid path and the number of hot neurons, from per-neuron firing rates (H,).

    Returns (perm, n_hot): perm sorts neurons by decreasing rate; the first n_hot (those firing on more than
    ``threshold`` of tokens, rounded up to ``multiple``) go through cuBLAS densely, the rest through the sparse
    kernel. The threshold: a dense neuron costs M * 4 * D flops at ~600 TFLOP/s, a sparse entry ~8 KB of L2
    traffic at ~6.5 TB/s, so dense pays above ~1.1% in this model; the measured sweep (BENCHMARKS.md: 0.4%..2.5%)
    was best at 1.6% or within noise of it on every prefill shape, hence the default.
    Apply perm offline (pack time) to gate/up rows, down_t rows (and Down's columns).
    """
    perm = torch.argsort(rates, descending=True, stable=True)
    n = int((rates > threshold).sum().item())
    n_hot = min(rates.numel() - rates.numel() % 8, -(-n // multiple) * multiple) if n else 0
    return perm, n_hot


def hot_part(x: torch.Tensor, act: torch.Tensor, up: torch.Tensor | None, down_t: torch.Tensor, n_hot: int,
             fused_glue: bool = DEFAULT_POLICY.fused_hot_glue) -> torch.Tensor:
    """The hot neurons' share (M, D) of the hybrid path, by cuBLAS: (relu(a) ⊙ (x·U_hotᵀ))·DownT_hot, a = act's
    first n_hot columns. fused_glue: relu(a) ⊙ u by ops.relu_mul in one pass (the same values as torch's two;
    SparsePolicy.fused_hot_glue)."""
    if up is None:
        h_hot = torch.relu(act[:, :n_hot])
    elif fused_glue:
        from sparsify_cli.kernels import ops

        h_hot = ops.relu_mul(act, n_hot, x @ up[:n_hot].T)  # (M, n_hot)
    else:
        h_hot = torch.relu(act[:, :n_hot]) * (x @ up[:n_hot].T)
    return h_hot @ down_t[:n_hot]


def hybrid_ffn(x: torch.Tensor, act: torch.Tensor, up: torch.Tensor | None, down_t: torch.Tensor,
               n_hot: int, fused_glue: bool = DEFAULT_POLICY.fused_hot_glue,
               lists: bool = DEFAULT_POLICY.hybrid_lists) -> torch.Tensor:
    """Hybrid FFN tail for hot-first neuron order: neurons [0, n_hot) densely (cuBLAS), the rest sparsely.

    act = x·w_actᵀ (M, H) already computed; out = Σ_{j<n_hot} dense + Σ_{j>=n_hot} sparse (one fp32 sum in the
    sparse kernel, which starts from the dense part's bf16 result). lists (SparsePolicy.hybrid_lists): the hot
    glue relu(a) ⊙ u and the cold entries' lists come from one pass (ops.relu_list) and the sparse kernel reads
    the lists; otherwise hot_part (fused_glue picks its relu(a) ⊙ u) and the kernel scans act. The same bits.
    """
    from sparsify_cli.kernels import ops

    if n_hot <= 0:
        return ops.relu_ffn(x, act, up, down_t)
    if not lists:
        return ops.relu_ffn(x, act, up, down_t, n_hot, hot_part(x, act, up, down_t, n_hot, fused_glue))
    h_hot, cold_lists = ops.relu_list(act, n_hot, x @ up[:n_hot].T if up is not None else None)
    return ops.relu_ffn(x, act, up, down_t, n_hot, h_hot @ down_t[:n_hot], cold_lists)


def ffn_forward(x: torch.Tensor, w_act: torch.Tensor, up: torch.Tensor | None, down_t: torch.Tensor, *,
                kernels: str = "auto", mode: str = "auto", tile: int = DEFAULT_TILE, slots: int = DEFAULT_SLOTS,
                policy: SparsePolicy = DEFAULT_POLICY, nnz_hint: float | None = None,
                cold_nnz_hint: float | None = None, via_twell: bool = False, n_hot: int = 0,
                down: torch.Tensor | None = None) -> torch.Tensor:
    """FFN block forward. kernels: auto|cuda|torch (backend); mode: auto|sparse|dense (path on the CUDA backend).

    ``nnz_hint``: mean active neurons per token over all H if known (e.g. calibrated per layer): the fused decode
    path's rule, which covers every neuron. ``cold_nnz_hint``: the same over the cold neurons >= n_hot, the hybrid
    prefill's rule. Where the rule's hint is missing it is estimated from a sample of the activation rows (mode
    auto; one host sync). ``via_twell``: materialize TwELL words (pack kernel)
    and run the TwELL kernels, instead of the fused kernels that list entries straight from the activation
    (faster while the gate GEMM does not write TwELL itself; BENCHMARKS.md). ``n_hot`` > 0: the weights are in
    hot-first order (hot_first_order) and prefill runs the hybrid path (hybrid_ffn). ``down``: Down (D, H) for
    the dense path's last GEMM, if kept (see dense_ffn).
    """
    backend = availability.resolve_backend(kernels)
    if backend == "torch" or x.device.type != "cuda" or mode == "dense":
        return dense_ffn(x, w_act, up, down_t, down=down)
    if mode not in ("auto", "sparse"):
        raise ValueError(f"mode must be auto, sparse or dense, got {mode!r}")
    if mode == "auto" and policy.use_dense_eager(x.shape[0], x.shape[1], w_act.shape[0]):
        return dense_ffn(x, w_act, up, down_t, down=down)
    from sparsify_cli.kernels import launchers, ops

    if policy.takes_fused_decode(x.shape[0], x.shape[1], mode == "sparse" or nnz_hint is not None, via_twell):
        # the density is known without the activation, so the activation is never materialized
        if mode == "auto" and not policy.choose_sparse(x.shape[0], nnz_hint, w_act.shape[0], fused=True):
            return dense_ffn(x, w_act, up, down_t, down=down)
        return ops.decode_ffn(x, w_act, up, down_t)
    if x.shape[0] <= launchers.GEMV_MAX_M and x.shape[1] % 8 == 0:
        act = ops.gemv(x, w_act)  # (M, H): decode's gate projection, memory-bound
    else:
        act = x @ w_act.T  # (M, H) cuBLAS
    hybrid = n_hot > 0 and x.shape[0] > policy.decode_max_m and not via_twell
    if mode == "auto":  # with the hybrid path, what matters is the density left to the sparse kernel
        hint = cold_nnz_hint if hybrid else nnz_hint
        nnz = hint if hint is not None else estimate_nnz(act[:, n_hot:] if hybrid else act, policy.sample_rows)
        if not policy.choose_sparse(x.shape[0], nnz, w_act.shape[0]):
            return dense_ffn(x, w_act, up, down_t, act=act, down=down)
    if hybrid:
        return hybrid_ffn(x, act, up, down_t, n_hot, policy.fused_hot_glue, policy.hybrid_lists)
    if not via_twell:
        return ops.relu_ffn(x, act, up, down_t)
    words = ops.twell_pack(act, tile, slots)
    return ops.twell_ffn(x, words, up, down_t, act, tile)
