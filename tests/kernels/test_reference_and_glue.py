"""CPU tests: the pure-torch references, the launchers' shape checks, the backend fallback and the policy."""

from __future__ import annotations

import pytest
import torch

from sparsify_cli.kernels import availability, ffn, launchers, reference


def _naive_pack(act, tile, slots):
    m, h = act.shape
    nt = (h + tile - 1) // tile
    words = torch.zeros(m, nt, slots, dtype=torch.int64)
    bits = act.view(torch.int16).to(torch.int64) & 0xFFFF
    for i in range(m):
        for t in range(nt):
            cols = [c for c in range(t * tile, min(h, (t + 1) * tile)) if not (act[i, c].float() <= 0)]
            words[i, t, 0] = len(cols)
            for k, c in enumerate(cols[: slots - 1]):
                w = (c << 16) | int(bits[i, c])
                words[i, t, 1 + k] = w - 2**32 if w >= 2**31 else w
    return words.to(torch.int32)


@pytest.mark.parametrize("m,h,tile,slots", [(3, 70, 32, 4), (5, 300, 256, 32), (2, 96, 96, 2), (4, 40000, 1024, 8)])
def test_pack_ref_matches_naive(m, h, tile, slots):
    g = torch.Generator().manual_seed(h)
    act = torch.randn(m, h, generator=g).to(torch.bfloat16)
    act[act.float() < 1.5] = -act[act.float() < 1.5].abs()  # ~7% positive
    act[0, 1] = float("nan")
    act[0, 2] = -0.0
    if h > 35000:  # high column indices (sign bit of the word set) on a few columns only
        act[:, :36000] = -1.0
    assert torch.equal(reference.twell_pack_ref(act, tile, slots), _naive_pack(act, tile, slots))


def test_unpack_ref_round_trip_and_overflow():
    g = torch.Generator().manual_seed(0)
    act = torch.randn(6, 500, generator=g).to(torch.bfloat16)
    words = reference.twell_pack_ref(act, 128, 8)  # K = 7: ~64 positives per tile, heavy overflow
    assert (words[:, :, 0] > 7).any()
    dense = reference.twell_unpack_ref(words, act, 128)
    assert torch.equal(dense, torch.relu(act.float()))
    sparse_act = torch.where(torch.rand(6, 500, generator=g) < 0.01, act.abs(), -act.abs())
    w2 = reference.twell_pack_ref(sparse_act, 128, 8)
    assert torch.equal(reference.twell_unpack_ref(w2, sparse_act, 128), torch.relu(sparse_act.float()))


@pytest.mark.parametrize("gated", [True, False])
def test_ffn_ref_equals_dense_ref(gated):
    g = torch.Generator().manual_seed(1)
    m, d, h = 9, 64, 200
    x = torch.randn(m, d, generator=g).to(torch.bfloat16)
    w = torch.randn(h, d, generator=g).to(torch.bfloat16)
    up = torch.randn(h, d, generator=g).to(torch.bfloat16) if gated else None
    down_t = torch.randn(h, d, generator=g).to(torch.bfloat16)
    act = x @ w.T
    out = reference.twell_ffn_ref(x, reference.twell_pack_ref(act, 64, 4), up, down_t, act, 64)
    want = reference.dense_ffn_ref(x, w, up, down_t, dtype=torch.float32)
    a = torch.relu(act.float())  # the bf16-rounded activation, as the kernels see it
    want = ((a * (x.float() @ up.float().T)) if gated else a) @ down_t.float()
    assert torch.allclose(out.float(), want, rtol=1e-2, atol=1e-2)


def test_launcher_checks_raise_clear_errors():
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    words = torch.zeros(4, 1, 32, dtype=torch.int32)
    down_t = torch.zeros(200, 128, dtype=torch.bfloat16)
    act = torch.zeros(4, 200, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    with pytest.raises(ValueError, match="CUDA"):
        launchers.check_ffn_args(x, words, None, down_t, act, out, 256)
    with pytest.raises(ValueError, match="multiple of 64"):
        launchers.check_ffn_args(torch.zeros(4, 100, dtype=torch.bfloat16), words, None, down_t, act, out, 256)
    with pytest.raises(ValueError, match="CUDA"):  # the act-only kernels pass words=None
        launchers.check_ffn_args(x, None, None, down_t, act, out, 256)
    with pytest.raises(ValueError, match="tile"):
        launchers.check_tile(100, 4)
    with pytest.raises(ValueError, match="slots"):
        launchers.check_tile(256, 1)
    with pytest.raises(ValueError, match="16-bit"):
        launchers.check_pack_args(torch.zeros(1, 70000, dtype=torch.bfloat16),
                                  torch.zeros(1, 274, 32, dtype=torch.int32), 256, 32)
    with pytest.raises(ValueError, match="bfloat16"):
        launchers.check_pack_args(torch.zeros(2, 64), torch.zeros(2, 1, 32, dtype=torch.int32), 256, 32)
    with pytest.raises(ValueError, match="shape"):
        launchers.check_pack_args(torch.zeros(2, 64, dtype=torch.bfloat16),
                                  torch.zeros(2, 2, 32, dtype=torch.int32), 256, 32)


def test_ffn_instance_choice():
    assert launchers.ffn_instance(2048, True) == ("twell_ffn_kernel<8, true, false, false>", 2048, 1)
    assert launchers.ffn_instance(64, False) == ("twell_ffn_kernel<1, false, false, false>", 256, 1)
    assert launchers.ffn_instance(4096, True) == ("twell_ffn_kernel<8, true, false, false>", 2048, 2)
    assert launchers.ffn_instance(2112, True)[2] == 2


def test_backend_fallback(monkeypatch):
    from sparsify_cli.errors import UserError

    monkeypatch.setattr(availability, "cuda_kernels_status", lambda: (False, "no CUDA GPU (test)"))
    assert availability.resolve_backend("auto") == "torch"
    assert availability.resolve_backend("torch") == "torch"
    with pytest.raises(UserError, match="no CUDA GPU"):
        availability.resolve_backend("cuda")
    with pytest.raises(UserError, match="one of"):
        availability.resolve_backend("triton")
    monkeypatch.setattr(availability, "cuda_kernels_status", lambda: (True, "ok"))
    assert availability.resolve_backend("auto") == "cuda"


def test_status_on_this_machine_is_consistent():
    ok, why = availability.cuda_kernels_status()
    assert isinstance(why, str) and why
    if not torch.cuda.is_available():
        assert not ok and "GPU" in why


def test_ffn_forward_cpu_fallback_equals_dense():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=g)
    w, up, down_t = (torch.randn(40, 64, generator=g) for _ in range(3))
    out = ffn.ffn_forward(x, w, up, down_t, kernels="auto")
    assert torch.allclose(out, reference.dense_ffn_ref(x, w, up, down_t))


def test_policy():
    p = ffn.SparsePolicy(max_density=0.01, decode_max_density=0.05, decode_max_m=64)
    assert p.choose_sparse(65536, 29, 5632)
    assert not p.choose_sparse(65536, 112, 5632)
    assert p.choose_sparse(8, 112, 5632)
    assert not p.choose_sparse(8, 1000, 5632)
    # the fused decode path has its own, higher limit (its density sweep); prefill sizes never take it
    q = ffn.SparsePolicy()
    assert not q.choose_sparse(8, 0.04 * 5632, 5632) and q.choose_sparse(8, 0.04 * 5632, 5632, fused=True)
    assert not q.choose_sparse(8, 0.07 * 5632, 5632, fused=True)
    assert not q.choose_sparse(16384, 0.04 * 5632, 5632, fused=True)
    assert q.takes_fused_decode(16, 2048, density_known=True)
    assert not q.takes_fused_decode(17, 2048, density_known=True)  # launchers.FUSED_MAX_M
    assert not q.takes_fused_decode(1, 2048 + 32, density_known=True)  # D not a multiple of 64
    assert not q.takes_fused_decode(1, 2048, density_known=False)
    assert not q.takes_fused_decode(1, 2048, density_known=True, via_twell=True)
    assert not ffn.SparsePolicy(fused_decode=False).takes_fused_decode(1, 2048, density_known=True)
    act = torch.tensor([[1.0, -1.0, 2.0], [0.0, 3.0, -2.0]])
    assert ffn.estimate_nnz(act) == 1.5


def test_imports_without_optional_deps():
    import subprocess
    import sys

    code = ("import sys; import sparsify_cli.kernels, sparsify_cli.kernels.ops, sparsify_cli.bench.ffn; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('cupy', 'hydra', 'omegaconf', 'wandb')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hot_first_order():
    rates = torch.tensor([0.0, 0.5, 0.02, 0.001, 0.012] * 8)
    perm, n_hot = ffn.hot_first_order(rates, threshold=0.011, multiple=8)
    assert sorted(perm.tolist()) == list(range(40))
    assert rates[perm].tolist() == sorted(rates.tolist(), reverse=True)
    assert n_hot == 24  # 24 neurons above 1.1%, already a multiple of 8
    assert ffn.hot_first_order(torch.zeros(16))[1] == 0
    assert ffn.hot_first_order(torch.full((100,), 0.5), multiple=128)[1] == 96  # capped, multiple of 8


@pytest.mark.parametrize("gated", [True, False])
def test_relu_ffn_ref_matches_twell_ref_and_hybrid_split(gated):
    g = torch.Generator().manual_seed(5)
    m, d, h = 7, 64, 300
    x = torch.randn(m, d, generator=g).to(torch.bfloat16)
    act = torch.randn(m, h, generator=g).to(torch.bfloat16)
    up = torch.randn(h, d, generator=g).to(torch.bfloat16) if gated else None
    down_t = torch.randn(h, d, generator=g).to(torch.bfloat16)
    full = reference.relu_ffn_ref(x, act, up, down_t)
    via_words = reference.twell_ffn_ref(x, reference.twell_pack_ref(act, 64, 8), up, down_t, act, 64)
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    assert rel(via_words, full) < 1e-2
    # hybrid: hot columns [0, 64) densely + the rest from c_start = 64 equals the whole
    a = torch.relu(act.float())
    hot = ((a[:, :64] * (x.float() @ up.float()[:64].T)) if gated else a[:, :64]) @ down_t.float()[:64]
    split = reference.relu_ffn_ref(x, act, up, down_t, c_start=64, init=hot.to(torch.bfloat16))
    assert rel(split, full) < 1e-2


def test_gemv_ref():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(33, 64, generator=g).to(torch.bfloat16)
    assert torch.equal(reference.gemv_ref(x, w), (x.float() @ w.float().T).to(torch.bfloat16))


def test_relu_list_ref_lists_cold_columns_in_order_and_keeps_true_counts():
    """The cold list's reference (docs/FORMAT.md, "Cold list"): the hot glue, then per row the true count of
    relu-active columns >= c_start and the first S - 1 of them as TwELL words, absolute columns, ascending."""
    act = torch.tensor([[1.0, -2.0, 3.0, 0.5, -0.0, 2.0, 0.0, 4.0],
                        [-1.0, 2.0, -3.0, -1.0, -1.0, -1.0, -1.0, -1.0],
                        [0.0, 0.0, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5]]).to(torch.bfloat16)
    u = torch.full((3, 2), 2.0, dtype=torch.bfloat16)
    h, lists = reference.relu_list_ref(act, 2, u, slots=4)
    assert torch.equal(h, torch.tensor([[2.0, 0.0], [0.0, 4.0], [0.0, 0.0]], dtype=torch.bfloat16))
    bits = act.view(torch.int16).to(torch.int64) & 0xFFFF

    def word(r, c):
        return int((c << 16) | int(bits[r, c]))

    assert lists.dtype == torch.int32 and lists.shape == (3, 4)
    assert lists[0].tolist() == [4, word(0, 2), word(0, 3), word(0, 5)]  # 4 active, 3 slots: overflow keeps 4
    assert lists[1].tolist() == [0, 0, 0, 0]  # -0.0 and negatives are not listed; the hot column 1 is not
    assert lists[2].tolist()[0] == 6 and lists[2].tolist()[1:] == [word(2, 2), word(2, 3), word(2, 4)]
    h_plain, lists_plain = reference.relu_list_ref(act, 2, None, slots=4)
    assert torch.equal(h_plain, torch.relu(act[:, :2])) and torch.equal(lists_plain, lists)
    assert reference.relu_list_ref(act, 8, None, slots=4)[1][:, 0].tolist() == [0, 0, 0]  # no cold columns


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("lists", [True, False])
def test_hybrid_ffn_traces_through_the_ops_fake_implementations(gated, lists):
    """torch.compile sees the CUDA ops through their fake implementations: the hybrid path, with the cold lists
    (ops.relu_list's (h, lists) pair, relu_ffn's lists argument) or without, gives (M, D) bf16 on meta tensors,
    so the ops' schemas and the Python glue around them hold without a GPU."""
    from sparsify_cli.kernels import ops

    bf = dict(dtype=torch.bfloat16, device="meta")
    x, act = torch.empty(300, 128, **bf), torch.empty(300, 512, **bf)
    up, down_t = torch.empty(512, 128, **bf), torch.empty(512, 128, **bf)
    out = ffn.hybrid_ffn(x, act, up if gated else None, down_t, 64, lists=lists)
    assert out.shape == (300, 128) and out.dtype == torch.bfloat16 and out.device.type == "meta"
    h, cold = ops.relu_list(act, 64, None)
    assert h.shape == (300, 64) and cold.shape == (300, launchers.LIST_SLOTS) and cold.dtype == torch.int32


def test_eager_calls_go_dense_where_the_host_cost_loses(monkeypatch):
    """SparsePolicy.use_dense_eager: decode sizes by eager_decode_dense, small prefills by their work (tokens x D x
    width <= eager_prefill_dense_max_work), when not capturing a CUDA graph and not compiling."""
    from sparsify_cli.kernels.ffn import SparsePolicy

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    p = SparsePolicy()
    paper = [p.use_dense_eager(m, 2048, 5632) for m in (1, 64, 65, 1024, 1127, 1128, 65536)]
    assert paper == [True] * 5 + [False] * 2
    assert p.use_dense_eager(1600, 2048, 3968) and not p.use_dense_eager(1601, 2048, 3968)  # the packed width
    assert p.use_dense_eager(221, 4096, 14336) and not p.use_dense_eager(222, 4096, 14336)  # Llama 8B's FFN
    assert p.use_dense_eager(64, 4096, 14336)  # decode: by eager_decode_dense whatever the work
    no_prefill = SparsePolicy(eager_prefill_dense_max_work=0)
    assert [no_prefill.use_dense_eager(m, 2048, 5632) for m in (64, 65)] == [True, False]
    no_decode = SparsePolicy(eager_decode_dense=False)
    assert [no_decode.use_dense_eager(m, 2048, 5632) for m in (64, 65)] == [False, True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not p.use_dense_eager(1, 2048, 5632) and not p.use_dense_eager(512, 2048, 5632)  # captured: sparse
