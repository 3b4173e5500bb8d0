"""Compile the sparse training op's CUDA kernels before timed training runs (CuPy keeps them in its disk cache, so
the training processes load them instead of compiling in the middle of a timed window).

    python3 tests/gpu/warm_train_kernels.py [--d 128 2048] [--device cuda --backend cuda]

One forward + backward of kernels.train_reference.sparse_ffn_train per model width D and per case, built so that
every kernel instance the training runs can use is launched: rows above the ELL width (the dense tail: fp32 weight
gradients) and none (bf16 ones), neurons firing on more than a neuron-pass chunk of tokens (split segments and
their reduction), and hot neurons (the dense-GEMM columns). `--device cpu --backend torch` runs the same cases
through the pure-torch reference in fp32 (a dry run of this script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def case_inputs(d: int, h: int, m: int, tail: bool, device, dtype, seed: int = 0):
    """x (M, D) and gated FFN weights with ~2% of the neurons active per token, 64 neurons active on almost every
    token, and (tail=True) 8 rows with every neuron active."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g)
    x[:, 0] = 1.0  # a constant feature: column 0 of the gate weights acts as a bias
    gate = torch.randn(h, d, generator=g) / d**0.5
    gate[:, 0] = -2.0  # ~2.3% of (token, neuron) pairs active
    gate[:64, 0] = 3.0  # 64 frequent neurons (segments longer than a neuron-pass chunk)
    if tail:
        x[:8, 0] = -20.0  # these rows: gate ≈ +40 on the ordinary neurons, all of them active (the dense tail)
    up = torch.randn(h, d, generator=g) / d**0.5
    down = torch.randn(d, h, generator=g) / h**0.5
    return [t.to(device=device, dtype=dtype) for t in (x, gate, up, down)]


def run_case(d: int, tail: bool, hot: bool, backend: str, device, dtype, h: int = 1024, m: int = 512,
             width: int = 256) -> str:
    from sparsify_cli.kernels.train_reference import sparse_ffn_train

    x, gate, up, down = case_inputs(d, h, m, tail, device, dtype)
    params = [t.requires_grad_() for t in (x, gate, up, down)]
    hot_mask = None
    if hot:
        hot_mask = torch.zeros(h, dtype=torch.bool, device=device)
        hot_mask[:64] = True
    res = sparse_ffn_train(*params, width=width, backend=backend, hot=hot_mask)
    (res.out.float().square().mean() + 0.1 * res.l1).backward()
    counts = res.token_counts
    n_tail = int((counts > width).sum())
    finite = all(bool(torch.isfinite(t.grad).all()) for t in params) and bool(torch.isfinite(res.out).all())
    if not finite:
        raise RuntimeError(f"D={d} tail={tail} hot={hot}: non-finite output or gradient")
    busiest = int(res.neuron_counts.max())
    return (f"D={d} tail={tail} hot={hot}: mean active {counts.float().mean():.1f}, rows above W={width}: {n_tail}, "
            f"busiest neuron on {busiest} of {m} tokens")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, nargs="+", default=[128, 2048], help="model widths to compile for")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="cuda")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.backend == "cuda" else torch.float32
    t0 = time.perf_counter()
    for d in args.d:
        for tail, hot in ((True, False), (False, False), (True, True), (False, True)):
            print(run_case(d, tail, hot, args.backend, device, dtype), flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"sparse training op warmed up in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
