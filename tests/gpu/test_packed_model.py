"""A packed model's FFN layer on the GPU: PackedFFN's CUDA path against its pure-torch path.

Error band: the CUDA path computes in bf16; it must stay within 2× plain torch-bf16's own error against the
fp32 result (+1e-3 slack for the tiny layers, where a handful of terms make relative errors noisy).
"""

from __future__ import annotations

import pytest
import torch

from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.pack.packed import PackedFFN

DEV = "cuda"


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _layer(gated: bool, d: int, h: int, nnz: float, seed: int):
    inp = make_ffn_inputs(8, d, h, nnz, device="cpu", dtype=torch.float32, seed=seed)
    weights = {"up_w": inp.up, "down_t": inp.down.t().contiguous(), "neuron_index": torch.arange(h)}
    if gated:
        weights["gate_w"] = inp.gate
    else:
        weights["up_w"] = inp.gate  # plain FFN: the deciding projection is U
    layout = {"tile": 256, "compression": 8, "stats": {"mean_active": nnz}}
    return PackedFFN(0, gated, weights, layout)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("d,h,nnz", [(2048, 5632, 29), (128, 211, 4), (256, 1000, 30)])
@pytest.mark.parametrize("m", [1, 7, 300])
def test_packed_ffn_cuda_matches_torch(gated, d, h, nnz, m):
    ffn = _layer(gated, d, h, nnz, seed=d + h + m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(1, m, d, generator=gen)
    x[..., 0] = 1.0
    ref = ffn(x)  # torch backend, fp32 weights: the reference
    ffn = ffn.to(DEV)
    for name in ("gate_w", "up_w", "down_t"):
        t = getattr(ffn, name)
        if t is not None:
            setattr(ffn, name, t.to(torch.bfloat16))
    ffn.backend = "torch"
    torch_bf16 = ffn(x.to(DEV, torch.bfloat16))
    ffn.backend = "cuda"
    out = ffn(x.to(DEV, torch.bfloat16))
    assert torch.isfinite(out).all()
    err, err_torch = _rel(out.cpu(), ref), _rel(torch_bf16.cpu(), ref)
    assert err <= 2 * err_torch + 1e-3, (err, err_torch)
