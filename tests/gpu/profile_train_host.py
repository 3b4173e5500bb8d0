"""Where the training FFN op's host time goes (development tool): cProfile over 20 fwd+bwd calls of the sparse op
at D 2048, H 5632, M 16384, nnz ~29 with a HotSet (as a layer calls it), then the host cost of single operations
measured while the GPU is busy (so no call waits on the device).

    python3 tests/gpu/profile_train_host.py
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time

import torch

from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.bench.train_ffn import sparse_step
from sparsify_cli.kernels import loader
from sparsify_cli.kernels.train_cuda import HotSet, hot_mask
from sparsify_cli.kernels.train_reference import sparse_ffn_train
from sparsify_cli.train.ffn_kernels import ell_width

DEV = torch.device("cuda")


def host_us(f, busy, n=200):
    """Host µs per call of f, queued behind GPU work so that nothing waits on the device."""
    for _ in range(4):
        busy()
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return t


def main():
    m, d, h = 16384, 2048, 5632
    inp = make_ffn_inputs(m, d, h, 29.0, device=DEV, seed=1)
    leaves = [t.detach().clone().requires_grad_(True) for t in (inp.x, inp.gate, inp.up, inp.down)]
    gy = torch.randn_like(inp.x) / m
    lam = torch.tensor(2e-5, device=DEV)
    with torch.no_grad():
        w = ell_width((inp.x @ inp.gate.T > 0).sum(1).float().mean().item())
        counts = sparse_ffn_train(*(t.detach() for t in leaves), width=w, backend="cuda").neuron_counts
    hot = HotSet.from_mask_host(hot_mask(counts, m).cpu(), DEV)

    def sp():
        return sparse_step(*leaves, gy, lam, w, "cuda", hot)

    for _ in range(5):
        sp()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    t0 = time.perf_counter()
    pr.enable()
    for _ in range(20):
        sp()
    torch.cuda.synchronize()
    pr.disable()
    print(f"wall per call under cProfile: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms")
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(40)
    print(s.getvalue()[:8000])

    big = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)

    def busy():
        return big @ big

    idx = torch.zeros(64, dtype=torch.int64, device=DEV)
    fn = loader.get_function("train_ffn.cu", "transpose_bf16_kernel")
    src = torch.zeros(64, 64, dtype=torch.bfloat16, device=DEV)
    dst = torch.empty_like(src)
    import numpy as np

    ops = {
        "torch.empty": lambda: torch.empty(1000, device=DEV),
        "torch.zeros": lambda: torch.zeros(1000, device=DEV),
        "index_select (64 rows)": lambda: inp.x.index_select(0, idx),
        "pinned empty(8)": lambda: torch.empty(8, dtype=torch.int64, pin_memory=True),
        "Event().record()": lambda: torch.cuda.Event().record(),
        "loader.current_stream()": loader.current_stream,
        "F.linear (64 x 2048 x 64)": lambda: torch.nn.functional.linear(inp.x[:64], inp.gate[:64]),
        "CuPy launch (4 args)": lambda: loader.launch(fn, (2, 2), (32, 8), (src.data_ptr(), dst.data_ptr(),
                                                                        np.int32(64), np.int32(64))),
        "autograd.Function no-op": lambda: torch.autograd.Function,
    }
    for name, f in ops.items():
        print(f"{host_us(f, busy):9.1f} us  {name}")


if __name__ == "__main__":
    main()
