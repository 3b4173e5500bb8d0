"""The train suite: FFN forward + backward with the L1 term, dense torch autograd vs the sparse training op.

    sparsify bench --suite train                          # GPU: D 2048, H 5632, M 16384, nnz 29/56/112, CUDA op
    sparsify bench --suite train --device cpu shapes=tiny # the pure-torch reference, to exercise the code path

One row per (tokens M, target nnz/token), inputs from bench/synthetic.py (PERFORMANCE.md's recipe, the ffn suite's
seeds). Both paths compute the same loss from the same leaves x (M, D), G, U (H, D), Down (D, H):

    dense   a = x·Gᵀ, h = relu(a)·(x·Uᵀ), out = h·Downᵀ, l1 = layer_l1(h) (the trainer's dense path, eager autograd)
    sparse  out, l1 = kernels.train_reference.sparse_ffn_train(x, G, U, Down, width=W, backend=...)
    loss = ⟨out, gy⟩ + λ·l1, gy ~ N(0, 1)/M; one call = forward + torch.autograd.grad to x, G, U and Down

in bf16 on a GPU (backend "cuda": the CUDA op), fp32 on the CPU (backend "torch": the reference, slow; its times
say nothing about the CUDA op). Each row: both median times (measure.compare: CUDA events or interleaved
perf_counter, after warm-up), the ratio, peak memory of one call each (GPU), the error of the sparse path's out,
l1 and four gradients against the dense path's (max|diff| / max|ref|), both paths' errors against a reference in a
wider dtype (fp32 from the same bf16 inputs; fp64 on the CPU) and their worst ratio over out and the gradients
(PERFORMANCE.md's rule: the sparse error at most 2× the dense one), the measured nnz per token (mean, p99, max,
per 256-tile max), the ELL width W (train/ffn_kernels.py's rule, as the training loop picks it; width= overrides)
and the rows above it (the dense tail).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from sparsify_cli.bench.measure import compare, nnz_stats, rel_err
from sparsify_cli.errors import UserError
from sparsify_cli.sparsity.penalty import layer_l1
# The ELL width the training loop gives a sparse layer (about 3× its mean active count, a multiple of 32, in
# [64, 512]): the rule itself, so that the suite times the op as training runs it.
from sparsify_cli.train.ffn_kernels import (ELL_WIDTH_MAX, ELL_WIDTH_MIN, ELL_WIDTH_MULTIPLE, ELL_WIDTH_PER_ACTIVE,
                                            ell_width)

GRADS = ("dx", "dgate", "dup", "ddown")  # gradients of x, G, U, Down, in that order
TENSORS = ("out", "l1", *GRADS)


def cuda_op_status() -> tuple[bool, str]:
    """(True, "ok") when sparse_ffn_train(backend="cuda") runs here, else (False, the reason): one forward and
    backward on a tiny bf16 input, so the check is the call the suite makes (and compiles the kernels first)."""
    from sparsify_cli.kernels import cuda_kernels_status
    from sparsify_cli.kernels.train_reference import sparse_ffn_train

    ok, why = cuda_kernels_status()
    if not ok:
        return False, why
    try:
        gen = torch.Generator("cuda").manual_seed(0)
        x, w = (torch.randn(n, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for n in (4, 128))
        down = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
        x.requires_grad_()
        res = sparse_ffn_train(x, w, w, down, width=64, backend="cuda")
        torch.autograd.grad(res.out.float().sum() + res.l1, [x])  # the backward kernels too
        torch.cuda.synchronize()
        if res.out.shape != (4, 64):
            return False, f"sparse_ffn_train(backend='cuda') returned out of shape {tuple(res.out.shape)}"
    except Exception as exc:  # noqa: BLE001 - whatever fails, the run must say why instead of timing nothing
        first = (str(exc).splitlines() or [""])[0][:200]
        return False, f"sparse_ffn_train(backend='cuda') failed: {type(exc).__name__}: {first}"
    return True, "ok"


def require_backend(backend: str, device: torch.device) -> None:
    """UserError, before any work, when ``backend`` cannot run the suite on ``device``."""
    if backend == "cuda":
        if device.type != "cuda":  # pragma: no cover - settings refuse it first
            raise UserError("backend=cuda needs --device cuda")
        ok, why = cuda_op_status()
        if not ok:
            raise UserError(f"the CUDA training op cannot run here: {why} (backend=torch times the pure-torch "
                            "reference on the GPU instead)")


def dense_step(x, gate, up, down, gy, lam) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Forward + backward of the dense block with the L1 term, eager autograd: (out, l1, (dx, dG, dU, dDown))."""
    h = torch.relu(F.linear(x, gate)) * F.linear(x, up)  # (M, H)
    out = F.linear(h, down)  # (M, D)
    l1 = layer_l1(h)  # () fp32, as the trainer's dense path
    grads = torch.autograd.grad([out, l1], [x, gate, up, down], [gy, lam])
    return out.detach(), l1.detach(), grads


def sparse_step(x, gate, up, down, gy, lam, width: int, backend: str, hot=None):
    """The same through sparse_ffn_train: (out, l1, (dx, dG, dU, dDown), token_counts)."""
    from sparsify_cli.kernels.train_reference import sparse_ffn_train

    res = sparse_ffn_train(x, gate, up, down, width=width, backend=backend, hot=hot)
    grads = torch.autograd.grad([res.out, res.l1], [x, gate, up, down], [gy, lam.to(res.l1.dtype)])
    return res.out.detach(), res.l1.detach(), grads, res.token_counts


def max_rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y − ref| / max|ref| (0 when both are 0, inf when only ref is)."""
    y, ref = y.double(), ref.double()
    num, den = float((y - ref).abs().max()), float(ref.abs().max())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def token_stats(x: torch.Tensor, gate: torch.Tensor, width: int) -> dict[str, Any]:
    """Active neurons per token of relu(x·Gᵀ) (mean, p99, max, per 256-tile max) and the rows above ``width``."""
    a = F.linear(x, gate)  # (M, H)
    stats = nnz_stats(a)
    per_tok = (a > 0).sum(1)  # (M,)
    del a
    tail = int((per_tok > width).sum())
    stats.update(nnz_p99=float(torch.quantile(per_tok.double(), 0.99)), tail_rows=tail,
                 tail_share=tail / per_tok.numel())
    return stats


def suite_row(s, m: int, nnz: float, device: torch.device, energy=None) -> dict:
    """One row of the train suite (module docstring): M tokens at about ``nnz`` active neurons per token."""
    from sparsify_cli.bench.synthetic import make_ffn_inputs

    backend = s.backend or ("cuda" if device.type == "cuda" else "torch")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ref_dtype = torch.float32 if dtype == torch.bfloat16 else torch.float64
    inp = make_ffn_inputs(m, s.d_model, s.d_ffn, nnz, device=device, dtype=dtype, seed=s.seed + int(nnz) + m)
    leaves = [t.detach().requires_grad_() for t in (inp.x, inp.gate, inp.up, inp.down)]
    del inp
    gen = torch.Generator(device).manual_seed(s.seed + 1)
    gy = (torch.randn(m, s.d_model, device=device, generator=gen) / m).to(dtype)  # ∂(token-mean loss)/∂out
    lam = torch.tensor(s.l1_coeff, device=device, dtype=torch.float32)

    with torch.no_grad():
        mean = nnz_stats(F.linear(leaves[0], leaves[1]))["nnz_mean"]
    width = s.width or ell_width(mean)
    row: dict[str, Any] = {"kind": "train", "M": m, "D": s.d_model, "H": s.d_ffn, "nnz_target": nnz}
    with torch.no_grad():
        row.update(token_stats(leaves[0], leaves[1], width))
    row.update(width=width, width_rule="given (width=)" if s.width else
               f"train.ffn_kernels.ell_width: {ELL_WIDTH_MULTIPLE}·⌈{ELL_WIDTH_PER_ACTIVE:g}·nnz_mean/"
               f"{ELL_WIDTH_MULTIPLE}⌉ in [{ELL_WIDTH_MIN}, {ELL_WIDTH_MAX}]",
               backend=backend, dtype=str(dtype).removeprefix("torch."), l1_coeff=s.l1_coeff,
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)

    hot = None
    if backend == "cuda":  # the busiest neurons go through dense GEMMs, chosen as a training layer does: from the
        # neuron counts of the previous call, known on the host (FeedForward.sparse_hot, a HotSet)
        from sparsify_cli.kernels.train_cuda import HOT_RATE, HotSet, hot_mask
        from sparsify_cli.kernels.train_reference import sparse_ffn_train

        with torch.no_grad():
            first = sparse_ffn_train(*(t.detach() for t in leaves), width=width, backend=backend)
        hot = HotSet.from_mask_host(hot_mask(first.neuron_counts, m).cpu(), device)
        row.update(n_hot=hot.n, hot_rate=HOT_RATE)

    def dense() -> tuple:
        return dense_step(*leaves, gy, lam)

    def sparse() -> tuple:
        return sparse_step(*leaves, gy, lam, width, backend, hot)[:3]

    row.update(_errors(leaves, gy, lam, width, backend, ref_dtype, hot))
    timing = compare(dense, sparse, device=device, tokens=m, reps=s.reps, warmup=s.warmup, energy=energy,
                     check=False)
    row.update({k: v for k, v in timing.items() if k != "rel_err"})
    row["sparse_path"] = (f"kernels.train_reference.sparse_ffn_train(backend={backend!r}, width={width}), "
                          f"{row['dtype']}" + (" — the pure-torch reference, not the CUDA op" if backend == "torch"
                                               else ""))
    row["notes"] = ("train: FFN forward + backward with the L1 term, one call = forward and autograd.grad to x and "
                    "the three weights; dense = eager torch autograd; errors: max|sparse − dense| / max|dense| per "
                    "tensor (rel err column: the worst of them)")
    del leaves, gy
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _errors(leaves, gy, lam, width: int, backend: str, ref_dtype: torch.dtype, hot=None) -> dict[str, Any]:
    """Errors of one sparse call against one dense call and both against a ``ref_dtype`` dense reference."""
    x, gate, up, down = leaves
    try:
        s_out, s_l1, s_grads, counts = sparse_step(x, gate, up, down, gy, lam, width, backend, hot)
    except ValueError as exc:  # the op's own shape/dtype checks
        raise UserError(f"sparse_ffn_train(backend={backend!r}) refused the row's inputs: {exc}") from None
    d_out, d_l1, d_grads = dense_step(x, gate, up, down, gy, lam)
    sparse_t = dict(zip(TENSORS, (s_out, s_l1, *s_grads)))
    dense_t = dict(zip(TENSORS, (d_out, d_l1, *d_grads)))
    errs: dict[str, Any] = {f"err_{k}": max_rel(sparse_t[k], dense_t[k]) for k in TENSORS}
    errs["rel_err"] = max(errs[f"err_{k}"] for k in TENSORS)
    errs["rel_err_out_frobenius"] = rel_err(s_out, d_out)
    errs["op_nnz_mean"] = float(counts.double().mean())  # the op's own count of non-zero h per token
    del s_out, s_grads, d_out, d_grads
    wide = [t.detach().to(ref_dtype).requires_grad_() for t in leaves]
    r_out, r_l1, r_grads = dense_step(*wide, gy.to(ref_dtype), lam.to(ref_dtype))
    ref_t = dict(zip(TENSORS, (r_out, r_l1, *r_grads)))
    ref = {k: {"sparse": max_rel(sparse_t[k], ref_t[k]), "dense": max_rel(dense_t[k], ref_t[k])} for k in TENSORS}
    errs["ref_dtype"] = str(ref_dtype).removeprefix("torch.")
    errs["ref_err"] = ref
    errs["ref_err_sparse"] = max(v["sparse"] for v in ref.values())
    errs["ref_err_dense"] = max(v["dense"] for v in ref.values())
    # PERFORMANCE.md's rule, per tensor: sparse error / dense error against the wide reference (≤ 2 passes); over
    # out and the gradients (l1 is one sum, whose error in either path is a matter of luck in the summation order)
    errs["ref_err_ratio"] = max(_ratio(ref[k]["sparse"], ref[k]["dense"]) for k in ("out", *GRADS))
    return errs


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else (0.0 if a == 0 else float("inf"))


def cases(s, device: torch.device, energy=None) -> list[tuple[str, Callable[[], dict]]]:
    """The suite's rows as (label, callable) pairs, after checking that the backend can run here."""
    require_backend(s.backend, device)
    return [(f"train M={m} nnz={nnz:g}", lambda m=m, nnz=nnz: suite_row(s, m, nnz, device, energy))
            for m in s.tokens for nnz in s.nnz]


def header(s) -> tuple[dict[str, Any], list[str]]:
    """The run's extra header fields (the report's top level) and its notes."""
    from sparsify_cli.kernels.train_reference import TRAIN_BACKENDS

    b = s.backend
    note = (f"sparse = sparse_ffn_train(backend={b!r})"
            + (": the pure-torch reference (slow), timed so that the code path runs; its times are not the CUDA "
               "op's" if b == "torch" else ": the CUDA training op"))
    return {"train_backend": b, "train_backends_available": sorted(TRAIN_BACKENDS)}, [note]
