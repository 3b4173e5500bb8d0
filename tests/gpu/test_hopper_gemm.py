"""The Hopper GEMM (kernels/hopper.py, kernels_cu/gemm_sm90.cu) on fresh random inputs: the plain GEMM against
the fp32 product (in torch bf16's band), the listing epilogue's TwELL words against the pure-torch pack of the
activation it computed (bit for bit, every word, poisoned buffers), the activation it writes where it must, and
the hybrid block through it against the listed path on the same activation (the same bits) and the fp32
reference. Skipped on GPUs other than compute capability 9.0."""

from __future__ import annotations

import pytest
import torch

from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels import ffn, hopper, launchers, ops, reference

DEV = "cuda"

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
    reason="the Hopper GEMM runs on compute capability 9.0 only")


def _operands(m, n, k, seed):
    """x (M, K), w (N, K) bf16, standard normal x and w scaled to unit-variance products."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(m, k, generator=gen, device=DEV).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen, device=DEV) / k ** 0.5).to(torch.bfloat16)
    return x, w


@pytest.mark.parametrize("m,n,k", [(1, 8, 64), (300, 520, 200), (777, 1000, 1000), (1029, 3968, 2048),
                                   (4096, 5632, 2048), (129, 264, 2056)])
def test_matmul_in_the_bf16_band(m, n, k):
    x, w = _operands(m, n, k, seed=m + n)
    ref = x.float() @ w.float().T
    out = hopper.matmul(x, w)
    scale = ref.abs().max().item()
    err = (out.float() - ref).abs().max().item() / scale
    err_torch = ((x @ w.T).float() - ref).abs().max().item() / scale
    assert torch.isfinite(out.float()).all()
    assert err <= 1.5 * err_torch + 1e-6, (err, err_torch)


def _masked_act(act: torch.Tensor, c_start: int) -> torch.Tensor:
    a = act.clone()
    a[:, :c_start] = 0
    return a


BUILDS = [(), ("GEMM_LIST_FAST=1",)]  # the default lister, and the prepared one (gemm_sm90.cu)


@pytest.mark.parametrize("defines", BUILDS)
@pytest.mark.parametrize("m,n,k,c_start,slots", [(300, 520, 256, 0, 16), (1029, 3968, 2048, 512, 16),
                                                 (777, 1000, 512, 384, 8), (64, 5632, 1024, 1536, 32),
                                                 (4100, 3968, 2048, 256, 4)])
def test_gate_list_words_are_the_pack_of_its_activation(m, n, k, c_start, slots, defines):
    """Every word equals twell_pack_ref of the activation (columns < c_start zeroed); act is written on the
    tiles holding columns < c_start and on every (64 rows, tile) block where a row overflowed."""
    x, w = _operands(m, n, k, seed=7 * m + n)
    # a sparse activation: a bias of -2.3 through x's last column (~1% positive), and row 5 aligned with w's rows
    # 256..299 (their products ~10 - 2.3): its second tile overflows
    x[:, -1] = 1.0
    w[:, -1] = -2.3
    if n >= 300:
        x[5, :-1] = (w[256:300, :-1].float().sum(0) * 10.0).to(torch.bfloat16)
    full = hopper.matmul(x, w)
    act = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device=DEV)
    words = torch.full((m, hopper.n_tiles(n), slots), 0x7FFFFFFF, dtype=torch.int32, device=DEV)
    hopper._launch(x, w, act, words, c_start, slots, defines)
    torch.cuda.synchronize()
    ref = reference.twell_pack_ref(_masked_act(full, c_start), hopper.TILE, slots)
    assert torch.equal(words, ref)
    density = (full[:, c_start:] > 0).float().mean().item()
    assert 0.0 < density < 0.2
    # act: the hot tiles whole, and the 64-row blocks of a tile where some row overflowed
    nt, k_slots = hopper.n_tiles(n), slots - 1
    over = ref[:, :, 0] > k_slots  # (M, NT)
    for t in range(nt):
        cols = slice(t * hopper.TILE, min(n, (t + 1) * hopper.TILE))
        rows = torch.zeros(m, dtype=torch.bool, device=DEV)
        if t * hopper.TILE < c_start:
            rows[:] = True
        else:
            blocks = over[:, t].nonzero().flatten() // 64
            for b in blocks.unique().tolist():
                rows[b * 64:(b + 1) * 64] = True
        if rows.any():
            assert torch.equal(act[rows, cols], full[rows, cols]), t


def _packed(m, d, h, nnz, seed):
    inp = make_ffn_inputs(m, d, h, nnz, device=DEV, seed=seed)
    rates = ((inp.x[: min(m, 2048)] @ inp.gate.T) > 0).float().mean(0)
    perm, n_hot = ffn.hot_first_order(rates)
    return inp, inp.gate[perm].contiguous(), inp.up[perm].contiguous(), inp.down.T[perm].contiguous(), n_hot


@pytest.mark.parametrize("m,d,h,nnz", [(1029, 2048, 5632, 29), (300, 512, 1536, 40), (4096, 1024, 2816, 112),
                                       (777, 256, 1000, 60)])
@pytest.mark.parametrize("gated", [True, False])
def test_hybrid_through_gate_list_same_bits(m, d, h, nnz, gated):
    inp, gate, up, down_t, n_hot = _packed(m, d, h, nnz, seed=m + nnz)
    n_hot = max(n_hot, 128)
    up = up if gated else None
    got = ffn.gate_listed_hybrid(inp.x, gate, up, down_t, n_hot)
    act = hopper.matmul(inp.x, gate)  # the activation the epilogue listed
    want = ffn.hybrid_ffn(inp.x, act, up, down_t, n_hot)
    assert torch.equal(got, want)
    ref32 = reference.dense_ffn_ref(inp.x.float(), gate.float(), up.float() if gated else None, down_t.float())
    bf16 = ffn.dense_ffn(inp.x, gate, up, down_t)
    rel = lambda a: ((a.float() - ref32).norm() / ref32.norm()).item()  # noqa: E731
    assert rel(got) <= 2 * rel(bf16) + 1e-4


def test_ffn_forward_takes_the_gate_list_path_when_asked_and_graphs_capture_it(monkeypatch):
    inp, gate, up, down_t, n_hot = _packed(2048, 1024, 2816, 29, seed=3)
    calls = []
    real = ffn.gate_listed_hybrid
    monkeypatch.setattr(ffn, "gate_listed_hybrid", lambda *a: calls.append(1) or real(*a))
    on = ffn.SparsePolicy(gate_list_epilogue=True)
    eager = ffn.ffn_forward(inp.x, gate, up, down_t, kernels="cuda", mode="sparse", n_hot=n_hot, policy=on)
    assert calls == [1]
    off = ffn.ffn_forward(inp.x, gate, up, down_t, kernels="cuda", mode="sparse", n_hot=n_hot)  # the default
    assert calls == [1]
    rel = ((eager.float() - off.float()).norm() / off.float().norm()).item()
    assert rel < 1e-2  # cuBLAS's activation may differ from the Hopper GEMM's in a last bit
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ffn.ffn_forward(inp.x, gate, up, down_t, kernels="cuda", mode="sparse", n_hot=n_hot, policy=on)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = ffn.ffn_forward(inp.x, gate, up, down_t, kernels="cuda", mode="sparse", n_hot=n_hot, policy=on)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


def test_relu_ffn_rejects_words_of_the_wrong_shape():
    x = torch.zeros(100, 256, dtype=torch.bfloat16, device=DEV)
    act = torch.zeros(100, 1000, dtype=torch.bfloat16, device=DEV)
    w = torch.zeros(1000, 256, dtype=torch.bfloat16, device=DEV)
    bad = torch.zeros(100, 3, 16, dtype=torch.int32, device=DEV)  # 1000 columns are 4 tiles
    with pytest.raises(ValueError):
        launchers.launch_relu_ffn(x, act, w, w, torch.empty_like(x), c_start=256, lists=bad)
    with pytest.raises(ValueError):
        hopper.gate_list(x, w, 256, slots=6)
    assert ops.gate_list(x, w, 256, 16)[1].shape == (100, 4, 16)
