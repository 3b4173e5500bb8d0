"""CUDA kernels vs the pure-torch references on fresh random inputs (pack bit-exact; FFN in the bf16 band).

Error band for the FFN: ‖kernel − ref32‖/‖ref32‖ ≤ 2 × ‖torch_bf16 − ref32‖/‖ref32‖ (+1e-4 slack), where
ref32 is the same sparse function evaluated in fp32 (dense torch, float32) and torch_bf16 is plain torch
computing the block in bf16 from the same bf16 inputs.
"""

from __future__ import annotations

import pytest
import torch

from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels import launchers, ops, reference

DEV = "cuda"
SHAPES = [  # (M, D, H)
    (1, 2048, 5632),
    (37, 256, 1000),  # ragged H, decode path
    (300, 512, 1536),  # M not a multiple of anything, prefill path
    (1029, 2048, 5632),
    (64, 64, 96),  # tiny D, ragged single tile
    (200, 2560, 700),  # D > 2048: chunked prefill kernel, x from memory
]


def _act(m, h, density, gen):
    """A bf16 activation (pre-relu) with about ``density`` of its entries positive (skewed per column)."""
    rates = torch.rand(h, generator=gen, device=DEV) ** 3
    rates = rates / rates.mean() * density
    u = torch.rand(m, h, generator=gen, device=DEV)
    vals = torch.randn(m, h, generator=gen, device=DEV).abs() + 0.01
    return torch.where(u < rates, vals, -vals).to(torch.bfloat16)


def _poison(t):
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    else:
        t.fill_(-123456789)
    return t


@pytest.mark.parametrize("m,h", [(1, 5632), (37, 1000), (513, 5632), (5, 33)])
@pytest.mark.parametrize("tile,slots", [(256, 32), (256, 16), (128, 8), (96, 12), (1024, 64), (32, 2)])
@pytest.mark.parametrize("density", [0.1, 0.01, 0.001])
def test_pack_bit_exact(m, h, tile, slots, density):
    gen = torch.Generator(device=DEV).manual_seed(m * 7 + h + tile + slots)
    act = _act(m, h, density, gen)
    act[0, : min(h, 3)] = float("nan")  # NaN counts as non-zero
    act[-1, -1] = -0.0
    words = _poison(torch.empty(m, launchers.n_tiles(h, tile), slots, dtype=torch.int32, device=DEV))
    launchers.launch_twell_pack(act, words, tile, slots)
    ref = reference.twell_pack_ref(act, tile, slots)
    assert torch.equal(words, ref)


def test_pack_overflow_counts_true():
    act = torch.ones(3, 512, dtype=torch.bfloat16, device=DEV)
    words = ops.twell_pack(act, 256, 32)
    assert words[:, :, 0].eq(256).all()
    assert torch.equal(words, reference.twell_pack_ref(act, 256, 32))


def _ffn_case(m, d, h, density, gated, path, slots=32, tile=256, seed=0):
    nnz = max(density * h, 0.5)
    inp = make_ffn_inputs(m, d, h, min(nnz, 0.3 * h), device=DEV, seed=seed)
    down_t = inp.down.T.contiguous()
    up = inp.up if gated else None
    act = inp.x @ inp.gate.T
    words = ops.twell_pack(act, tile, slots)
    out = _poison(torch.empty(m, d, dtype=torch.bfloat16, device=DEV))
    if path in ("decode_act", "prefill_act"):
        launchers.launch_relu_ffn(inp.x, act, up, down_t, out, path=path.split("_")[0], tile=tile)
    elif path == "prefill_mb3":
        launchers.launch_twell_ffn(inp.x, words, up, down_t, act, out, tile, path="prefill",
                                   defines=("FFN_MIN_BLOCKS=3",))
    elif path == "prefill_split":
        launchers.launch_twell_ffn(inp.x, words, up, down_t, act, out, tile, path="prefill", split=True)
    else:
        launchers.launch_twell_ffn(inp.x, words, up, down_t, act, out, tile, path=path)
    torch.cuda.synchronize()
    # fp32 reference of the same function (same bf16 activation) and torch's own bf16 error
    a32 = reference.twell_unpack_ref(words, act, tile)
    ref32 = (a32 * (inp.x.float() @ inp.up.float().T) if gated else a32) @ down_t.float()
    a16 = torch.relu(act)
    t16 = ((a16 * (inp.x @ inp.up.T)) if gated else a16) @ down_t
    return out, ref32, t16, words


def _rel(a, b):
    return ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("m,d,h", SHAPES)
@pytest.mark.parametrize("density", [0.1, 0.02, 0.005, 0.001])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("path", ["auto", "prefill", "decode", "decode_act", "prefill_act", "prefill_mb3",
                                  "prefill_split"])
def test_ffn_matches_reference(m, d, h, density, gated, path):
    out, ref32, t16, words = _ffn_case(m, d, h, density, gated, path, seed=m + d + h)
    assert not torch.isnan(out).any(), "unwritten (poisoned) output elements"
    err, terr = _rel(out, ref32), _rel(t16, ref32)
    assert err <= 2 * terr + 1e-4, f"kernel rel err {err:.2e} vs torch bf16 {terr:.2e}"


@pytest.mark.parametrize("path", ["prefill", "decode", "prefill_mb3", "prefill_split", "prefill_act", "decode_act"])
@pytest.mark.parametrize("gated", [True, False])
def test_ffn_overflow_exact(path, gated):
    """Tiles with more entries than slots (K=3 at slots=4) are computed from the dense activation, exactly."""
    m, d, h = (50, 512, 1100) if path.startswith("decode") else (333, 512, 1100)
    if path in ("prefill_mb3", "prefill_split"):
        m, d, h = 257, 2560, 3000  # chunked D, tiles of up to 256 entries in the list
    out, ref32, t16, words = _ffn_case(m, d, h, 0.05, gated, path, slots=4, seed=11)
    assert (words[:, :, 0] > 3).float().mean() > 0.2, "test must overflow many tiles"
    assert not torch.isnan(out).any()
    # against the full dense fp32 FFN (not the words' view): overflow must not drop anything
    err, terr = _rel(out, ref32), _rel(t16, ref32)
    assert err <= 2 * terr + 1e-4, f"kernel rel err {err:.2e} vs torch bf16 {terr:.2e}"


def test_ffn_forward_end_to_end_and_policy():
    from sparsify_cli.kernels import ffn

    for m in (700, 3, 1):
        _end_to_end(m, ffn)


def _end_to_end(m, ffn):
    inp = make_ffn_inputs(m, 1024, 2816, 20, device=DEV, seed=3)
    down_t = inp.down.T.contiguous()
    ref = reference.dense_ffn_ref(inp.x, inp.gate, inp.up, down_t)
    dense = ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="dense")
    sparse = ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="sparse", kernels="cuda")
    twell = ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="sparse", kernels="cuda", via_twell=True)
    assert _rel(twell, ref) <= 2 * _rel(dense, ref) + 1e-4
    auto = ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="auto", kernels="cuda")
    terr = _rel(dense, ref)
    assert _rel(sparse, ref) <= 2 * terr + 1e-4
    assert _rel(auto, ref) <= 2 * terr + 1e-4


def test_ops_on_side_stream_and_graph():
    inp = make_ffn_inputs(100, 512, 1024, 10, device=DEV, seed=5)
    down_t = inp.down.T.contiguous()
    act = inp.x @ inp.gate.T
    want = ops.twell_ffn(inp.x, ops.twell_pack(act, 256, 32), inp.up, down_t, act, 256)
    assert torch.equal(ops.relu_ffn(inp.x, act, inp.up, down_t), want)  # same list order -> same sums
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = ops.twell_ffn(inp.x, ops.twell_pack(act, 256, 32), inp.up, down_t, act, 256)
    torch.cuda.current_stream().wait_stream(s)
    assert torch.equal(got, want)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = ops.twell_ffn(inp.x, ops.twell_pack(act, 256, 32), inp.up, down_t, act, 256)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(gout, want)


def test_compile_fullgraph():
    inp = make_ffn_inputs(80, 256, 512, 8, device=DEV, seed=9)
    down_t = inp.down.T.contiguous()

    def f(x, g, u, dt):
        act = x @ g.T
        return torch.ops.sparsify.twell_ffn(x, torch.ops.sparsify.twell_pack(act, 256, 32), u, dt, act, 256)

    want = f(inp.x, inp.gate, inp.up, down_t)
    got = torch.compile(f, fullgraph=True)(inp.x, inp.gate, inp.up, down_t)
    assert torch.equal(got, want)


def test_launcher_rejects_bad_shapes_on_gpu():
    x = torch.zeros(4, 100, dtype=torch.bfloat16, device=DEV)
    with pytest.raises(ValueError, match="multiple of 64"):
        launchers.launch_twell_ffn(x, torch.zeros(4, 1, 32, dtype=torch.int32, device=DEV), None,
                                   torch.zeros(8, 100, dtype=torch.bfloat16, device=DEV),
                                   torch.zeros(4, 8, dtype=torch.bfloat16, device=DEV), torch.empty_like(x), 256)


@pytest.mark.parametrize("m,d,h,nnz", [(300, 512, 1536, 40), (1029, 2048, 5632, 29), (100, 2560, 700, 20)])
@pytest.mark.parametrize("gated", [True, False])
def test_hybrid_matches_reference(m, d, h, nnz, gated):
    """Hot-first order: hot neurons through cuBLAS, the rest through the sparse kernel (c_start/init), reading
    relu_list's lists (the default) or scanning act."""
    from sparsify_cli.kernels import ffn

    inp = make_ffn_inputs(m, d, h, nnz, device=DEV, seed=m + h)
    act0 = inp.x @ inp.gate.T
    perm, n_hot = ffn.hot_first_order((act0 > 0).float().mean(0), threshold=0.005, multiple=64)
    assert 0 < n_hot < h
    gate, up, down_t = inp.gate[perm], inp.up[perm], inp.down.T[perm].contiguous()
    up = up if gated else None
    act = inp.x @ gate.T
    out = ffn.hybrid_ffn(inp.x, act, up, down_t, n_hot, lists=True)  # ops.relu_list, the kernel reading lists
    # the kernel scanning act, the hot glue by ops.relu_mul or by torch's two passes: the same bits
    assert torch.equal(ffn.hybrid_ffn(inp.x, act, up, down_t, n_hot, fused_glue=True, lists=False), out)
    assert torch.equal(ffn.hybrid_ffn(inp.x, act, up, down_t, n_hot, fused_glue=False, lists=False), out)
    a = torch.relu(act.float())
    ref32 = ((a * (inp.x.float() @ up.float().T)) if gated else a) @ down_t.float()
    a16 = torch.relu(act)
    t16 = ((a16 * (inp.x @ up.T)) if gated else a16) @ down_t
    assert not torch.isnan(out).any()
    assert _rel(out, ref32) <= 2 * _rel(t16, ref32) + 1e-4, (_rel(out, ref32), _rel(t16, ref32))


def test_relu_ffn_c_start_and_init_semantics():
    """c_start skips columns exactly; init is added."""
    inp = make_ffn_inputs(200, 256, 640, 30, device=DEV, seed=4)
    down_t = inp.down.T.contiguous()
    act = inp.x @ inp.gate.T
    init = torch.randn(200, 256, device=DEV).to(torch.bfloat16)
    out = _poison(torch.empty(200, 256, dtype=torch.bfloat16, device=DEV))
    launchers.launch_relu_ffn(inp.x, act, inp.up, down_t, out, c_start=128, init=init)
    a = torch.relu(act.float())
    a[:, :128] = 0
    ref = init.float() + (a * (inp.x.float() @ inp.up.float().T)) @ down_t.float()
    assert _rel(out, ref) < 5e-3
    with pytest.raises(ValueError, match="multiple of 8"):
        launchers.launch_relu_ffn(inp.x, act, inp.up, down_t, out, c_start=3)


def _listed(lists):
    """The list's valid part: each row's count and its first min(count, S - 1) words (the rest is unwritten)."""
    s = lists.shape[1]
    keep = torch.arange(s, device=lists.device)[None, :] <= lists[:, :1].clamp(max=s - 1)
    return torch.where(keep, lists, torch.zeros_like(lists))


@pytest.mark.parametrize("m,h,c_start,slots,density", [
    (1, 5632, 512, 64, 0.005), (1029, 3968, 512, 64, 0.005),  # the packed layer's shape
    (300, 1001, 136, 16, 0.05),  # ragged H (scalar loads), rows that overflow 15 words
    (77, 704, 0, 64, 0.02),  # no hot columns
    (5, 72, 72, 64, 0.3),  # no cold columns
    (129, 1536, 64, 2, 0.3)])  # one word per row: nearly every row overflows
@pytest.mark.parametrize("gated", [True, False])
def test_relu_list_matches_reference(m, h, c_start, slots, density, gated):
    """The hybrid's activation pass: the hot glue bit-exact (relu_mul's values), and the cold list bit-exact: true
    counts, the words in ascending order, overflowed rows keeping their true count; NaN and -0.0 as the scan
    treats them."""
    gen = torch.Generator(device=DEV).manual_seed(m + h + c_start + slots)
    act = _act(m, h, density, gen)
    act[0, -1] = float("nan")  # a NaN is listed (non-zero)
    act[-1, h // 2] = -0.0
    u = torch.randn(m, c_start, generator=gen, device=DEV).to(torch.bfloat16) if gated else None
    h_ref, lists_ref = reference.relu_list_ref(act, c_start, u, slots)
    # the default build, the scan's other step widths and the hot glue's
    for defines in ((), ("LIST_STEP=4",), ("LIST_STEP=8",), ("LIST_GLUE=1",), ("LIST_GLUE=8",), ("LIST_PREFETCH=1",)):
        hh = _poison(torch.empty(m, c_start, dtype=torch.bfloat16, device=DEV))
        lists = _poison(torch.empty(m, slots, dtype=torch.int32, device=DEV))
        launchers.launch_relu_list(act, c_start, u, hh, lists, defines)
        torch.testing.assert_close(hh, h_ref, rtol=0, atol=0, equal_nan=True)  # a NaN among the hot columns stays
        assert torch.equal(_listed(lists), lists_ref)
    if gated and c_start:
        torch.testing.assert_close(hh, ops.relu_mul(act, c_start, u), rtol=0, atol=0, equal_nan=True)
    if density >= 0.3 and slots == 2 and c_start < h:
        assert (lists[:, 0] > 1).any(), "the overflow case was not exercised"


@pytest.mark.parametrize("m,d,h,c_start,slots,density", [
    (1029, 2048, 5632, 512, 64, 0.005), (300, 512, 1001, 136, 16, 0.05), (100, 2560, 700, 0, 64, 0.02),
    (129, 1024, 1536, 64, 8, 0.3)])  # many rows overflow their 7 words: scanned from act instead
@pytest.mark.parametrize("gated", [True, False])
def test_relu_ffn_from_lists_same_bits(m, d, h, c_start, slots, density, gated):
    """The gather reading relu_list's lists gives the same bits as the gather scanning act (the same entries in
    the same order), with and without init, and overflowed rows are exact; the result matches the reference."""
    inp = make_ffn_inputs(m, d, h, density * h, device=DEV, seed=m + h + slots)
    down_t = inp.down.T.contiguous()
    up = inp.up if gated else None
    act = inp.x @ inp.gate.T
    lists = _poison(torch.empty(m, slots, dtype=torch.int32, device=DEV))
    hh = torch.empty(m, c_start, dtype=torch.bfloat16, device=DEV)
    launchers.launch_relu_list(act, c_start, None, hh, lists)
    init = torch.randn(m, d, device=DEV).to(torch.bfloat16)
    for extra in (None, init):
        scanned = _poison(torch.empty(m, d, dtype=torch.bfloat16, device=DEV))
        listed = _poison(torch.empty(m, d, dtype=torch.bfloat16, device=DEV))
        launchers.launch_relu_ffn(inp.x, act, up, down_t, scanned, path="prefill", c_start=c_start, init=extra)
        launchers.launch_relu_ffn(inp.x, act, up, down_t, listed, path="prefill", c_start=c_start, init=extra,
                                  lists=lists)
        assert not torch.isnan(listed).any(), "unwritten (poisoned) output elements"
        assert torch.equal(listed, scanned)
        a = torch.relu(act.float())
        a[:, :c_start] = 0
        uu = inp.x.float() @ inp.up.float().T if gated else 1.0
        ref = (a * uu) @ down_t.float() + (extra.float() if extra is not None else 0.0)
        assert _rel(listed, ref) < 5e-3
    if slots == 8:
        assert (lists[:, 0] > slots - 1).any(), "the overflow case was not exercised"
    with pytest.raises(ValueError, match="lists must be"):
        launchers.launch_relu_ffn(inp.x, act, up, down_t, listed, path="prefill", lists=lists[:, :1].contiguous())


# A build of the prefill kernel that must give the same bits as the default: the x copy in shared memory
# (FFN_X_SMEM / FFN_ACT_X_SMEM) turned off, and a listed row's up dots one at a time in the batch loop
# (FFN_UP_PAIRS=0) where the default takes them in pairs. (Each build is compiled for every shape below on each run.)
X_OFF = ("FFN_X_SMEM=0", "FFN_ACT_X_SMEM=0", "FFN_UP_PAIRS=0")


@pytest.mark.parametrize("m,d,h,density", [(1029, 2048, 5632, 0.005), (300, 512, 1001, 0.05), (129, 1024, 5632, 0.3),
                                            (77, 2560, 704, 0.02), (65, 4096, 1000, 0.02), (33, 4160, 700, 0.02)])
@pytest.mark.parametrize("gated", [True, False])
def test_cold_kernel_builds_same_bits(m, d, h, density, gated):
    """Where the prefill kernel keeps x (shared memory up to 4096 columns from act, 2048 from TwELL; D 2560, 4096
    and 4160 straddle those limits and read it through L1 beyond them), with FROM_ACT's per-warp list of 512 (dense
    rows take more batches, a cold list longer than 512 words is scanned instead), changes where bytes live, not
    the sums: the same bits in every build, scanning act, reading lists or TwELL words; so does taking a listed
    row's up dots one at a time (the default takes them in pairs)."""
    inp = make_ffn_inputs(m, d, h, density * h, device=DEV, seed=m + h + 3)
    down_t = inp.down.T.contiguous()
    up = inp.up if gated else None
    act = inp.x @ inp.gate.T
    init = torch.randn(m, d, device=DEV).to(torch.bfloat16)
    c_start = 64
    lists = torch.empty(m, launchers.LIST_SLOTS, dtype=torch.int32, device=DEV)
    long_lists = torch.empty(m, launchers.FFN_CAP + 1, dtype=torch.int32, device=DEV)
    hh = torch.empty(m, c_start, dtype=torch.bfloat16, device=DEV)
    launchers.launch_relu_list(act, c_start, None, hh, lists)
    launchers.launch_relu_list(act, c_start, None, hh, long_lists)
    builds = [launchers.FFN_DEFAULT_DEFINES + extra for extra in ((), X_OFF)]
    outs = []
    for defines in builds:
        for lst in (None, lists, long_lists):
            out = _poison(torch.empty(m, d, dtype=torch.bfloat16, device=DEV))
            launchers.launch_relu_ffn(inp.x, act, up, down_t, out, path="prefill", c_start=c_start, init=init,
                                      lists=lst, defines=defines)
            outs.append(out)
    for out in outs[1:]:
        assert not torch.isnan(out).any(), "unwritten (poisoned) output elements"
        assert torch.equal(outs[0], out)
    words = ops.twell_pack(act, 256, 32)
    twell_outs = []
    for defines in builds:
        out = _poison(torch.empty(m, d, dtype=torch.bfloat16, device=DEV))
        launchers.launch_twell_ffn(inp.x, words, up, down_t, act, out, 256, path="prefill", defines=defines)
        twell_outs.append(out)
    assert not torch.isnan(twell_outs[0]).any(), "unwritten (poisoned) output elements"
    assert torch.equal(twell_outs[0], twell_outs[1])


@pytest.mark.parametrize("m,d,h,density", [(1029, 2048, 5632, 0.02), (300, 512, 1001, 0.02), (77, 2560, 704, 0.02),
                                            (129, 1024, 5632, 0.3), (33, 2560, 3001, 0.3)])
@pytest.mark.parametrize("gated", [True, False])
def test_cache_hint_builds_same_bits(m, d, h, density, gated):
    """FFN_STREAM_HINTS (eviction priorities of the activation, init, out) and FFN_ACT_PREFETCH (the activation row
    prefetched to L2) are hints only: the same bits as the plain build, and the reference's result, whole rows and
    hybrid (c_start/init), aligned and unaligned (H % 8 != 0) activations, rows of one batch and dense rows that
    need several (more than the 1024 entries a warp lists at a time)."""
    inp = make_ffn_inputs(m, d, h, density * h, device=DEV, seed=m + d)
    down_t = inp.down.T.contiguous()
    up = inp.up if gated else None
    act = inp.x @ inp.gate.T
    init = torch.randn(m, d, device=DEV).to(torch.bfloat16)
    for c_start, extra in ((0, None), (64, init)):
        outs = []
        for hints, prefetch in ((0, 0), (1, 0), (1, 1)):
            out = _poison(torch.empty(m, d, dtype=torch.bfloat16, device=DEV))
            launchers.launch_relu_ffn(inp.x, act, up, down_t, out, path="prefill", c_start=c_start, init=extra,
                                      defines=("FFN_MIN_BLOCKS=4", f"FFN_STREAM_HINTS={hints}",
                                               f"FFN_ACT_PREFETCH={prefetch}"))
            outs.append(out)
        torch.cuda.synchronize()
        a = torch.relu(act.float())
        a[:, :c_start] = 0
        u = inp.x.float() @ inp.up.float().T if gated else 1.0
        ref = (a * u) @ down_t.float() + (extra.float() if extra is not None else 0.0)
        assert _rel(outs[0], ref) < 5e-3
        for out in outs[1:]:
            assert not torch.isnan(out).any(), "unwritten (poisoned) output elements"
            assert torch.equal(outs[0], out)


@pytest.mark.parametrize("m,h,n", [(1, 64, 8), (333, 5632, 512), (1029, 1001, 136), (77, 704, 13), (5, 72, 72)])
def test_relu_mul_same_values_as_torch(m, h, n):
    """The hybrid's hot glue h = relu(act[:, :n]) * u: torch's values (one bf16 rounding of the fp32 product), the
    16-byte path (H % 8 == 0, n % 8 == 0) and the scalar one (ragged H or n, a misaligned view), NaN kept."""
    g = torch.Generator(device=DEV).manual_seed(m + h + n)
    act = torch.randn(m, h, generator=g, device=DEV).to(torch.bfloat16)
    u = torch.randn(m, n, generator=g, device=DEV).to(torch.bfloat16)
    act[0, : min(n, 4)] = torch.tensor([-0.0, 0.0, 1e-30, -1e-30], device=DEV)[: min(n, 4)].to(torch.bfloat16)
    assert torch.equal(ops.relu_mul(act, n, u), reference.relu_mul_ref(act, n, u))
    if h > n:  # a view that starts one column in: not 16-byte aligned
        h1 = _poison(torch.empty_like(u))
        launchers.launch_relu_mul(act[:, 1:n + 1], u, h1)
        assert torch.equal(h1, torch.relu(act[:, 1:n + 1]) * u)
    act[-1, n - 1] = float("nan")
    assert torch.isnan(ops.relu_mul(act, n, u)[-1, n - 1])


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("d,h", [(2048, 5632), (64, 33), (2560, 1001), (4160, 700)])
def test_gemv_matches_reference(m, d, h):
    g = torch.Generator(device=DEV).manual_seed(d + h + m)
    x = torch.randn(m, d, generator=g, device=DEV).to(torch.bfloat16)
    w = (torch.randn(h, d, generator=g, device=DEV) * 0.02).to(torch.bfloat16)
    out = _poison(torch.empty(m, h, dtype=torch.bfloat16, device=DEV))
    launchers.launch_gemv(x, w, out)
    ref32 = x.float() @ w.float().T
    assert not torch.isnan(out).any()
    assert _rel(out, ref32) <= 2 * _rel(x @ w.T, ref32) + 1e-4
    with pytest.raises(ValueError, match="tokens"):
        launchers.launch_gemv(torch.zeros(3, d, dtype=torch.bfloat16, device=DEV), w,
                              torch.empty(3, h, dtype=torch.bfloat16, device=DEV))


def test_eager_decode_goes_dense_and_graph_captured_decode_stays_sparse(monkeypatch):
    """Decode-sized calls and small prefills run eagerly take the dense path (the sparse path's host cost loses
    there); captured in a CUDA graph they run the sparse kernels; both agree with the reference."""
    from sparsify_cli.kernels import ffn

    inp = make_ffn_inputs(4, 1024, 2816, 20, device=DEV, seed=9)
    down_t = inp.down.T.contiguous()
    ref = reference.dense_ffn_ref(inp.x, inp.gate, inp.up, down_t)
    calls = []
    real_dense = ffn.dense_ffn
    monkeypatch.setattr(ffn, "dense_ffn", lambda *a, **k: calls.append(1) or real_dense(*a, **k))
    eager = ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="auto", kernels="cuda", nnz_hint=20.0)
    assert calls == [1]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture (kernel compilation)
        ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="auto", kernels="cuda", nnz_hint=20.0)
    torch.cuda.current_stream().wait_stream(s)
    calls.clear()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="auto", kernels="cuda", nnz_hint=20.0)
    g.replay()
    torch.cuda.synchronize()
    assert calls == []  # the sparse kernels ran inside the graph
    dense_err = _rel(real_dense(inp.x, inp.gate, inp.up, down_t), ref)
    assert _rel(eager, ref) <= 2 * dense_err + 1e-4 and _rel(captured, ref) <= 2 * dense_err + 1e-4
    small = make_ffn_inputs(512, 1024, 2816, 20, device=DEV, seed=10)
    calls.clear()
    ffn.ffn_forward(small.x, small.gate, small.up, small.down.T.contiguous(), mode="auto", kernels="cuda",
                    nnz_hint=20.0)
    assert calls == [1]  # a small prefill run eagerly: dense too (eager_prefill_dense_max_work)
    big = make_ffn_inputs(8192, 1024, 2816, 20, device=DEV, seed=10)  # 8192 x 1024 x 2816 above that work
    calls.clear()
    ffn.ffn_forward(big.x, big.gate, big.up, big.down.T.contiguous(), mode="auto", kernels="cuda", nnz_hint=20.0)
    assert calls == []  # larger prefill: sparse at this density, eager or not


# (D, H): ragged H, D > 4096, and H > 16384 (the down kernel's listing then takes two passes over h)
FUSED_SHAPES = [(2048, 5632), (64, 33), (2560, 1001), (256, 1000), (4160, 700), (256, 16640)]


def _fused_reference(inp, down_t, gated):
    """h and out in fp32 from a rounded once to bf16 (as the fused kernels do), and torch's bf16 out."""
    act = (inp.x.float() @ inp.gate.float().T).to(torch.bfloat16)
    a32 = torch.relu(act.float())
    h32 = a32 * (inp.x.float() @ inp.up.float().T) if gated else a32
    a16 = torch.relu(inp.x @ inp.gate.T)
    t16 = ((a16 * (inp.x @ inp.up.T)) if gated else a16) @ down_t
    return h32, h32 @ down_t.float(), t16


@pytest.mark.parametrize("m,impl", [(1, "auto"), (2, "auto"), (3, "auto"), (5, "auto"), (8, "auto"), (1, "mma"),
                                    (2, "gemv"), (8, "gemv"), (9, "auto"), (12, "auto"), (16, "auto")])
@pytest.mark.parametrize("d,h", FUSED_SHAPES)
@pytest.mark.parametrize("density", [0.3, 0.02, 0.005, 0.001])
@pytest.mark.parametrize("gated", [True, False])
def test_fused_decode_matches_reference(m, impl, d, h, density, gated):
    """The fused decode path (gate projection + relu + up dots, then the down rows; the gate projection on CUDA
    cores or tensor cores) against fp32 math on the same bf16 activation; density 0.3 at H 5632 lists > 1024
    entries per token (several batches)."""
    inp = make_ffn_inputs(m, d, h, max(density * h, 0.5), device=DEV, seed=m * 31 + d + h)
    down_t = inp.down.T.contiguous()
    up = inp.up if gated else None
    out = _poison(torch.empty(m, d, dtype=torch.bfloat16, device=DEV))
    hbuf = launchers.launch_decode_ffn(inp.x, inp.gate, up, down_t, out, impl=impl)
    torch.cuda.synchronize()
    h32, ref32, t16 = _fused_reference(inp, down_t, gated)
    assert not torch.isnan(out).any(), "unwritten (poisoned) output elements"
    err, terr = _rel(out, ref32), _rel(t16, ref32)
    assert err <= 2 * terr + 1e-4, f"fused decode rel err {err:.2e} vs torch bf16 {terr:.2e}"
    # the h the first kernel hands over: the active set (a's rounding may differ from torch's by one ulp, which
    # can flip only values at the relu boundary) and the values
    flips = (hbuf[:, :h] != 0).ne(h32 != 0).sum().item()
    assert flips <= max(1, 1e-3 * (h32 != 0).sum().item()), flips
    assert _rel(hbuf[:, :h], h32) < 1e-2


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("d,h", [(2048, 5632), (256, 1001), (64, 33)])
def test_fused_gate_up_bits_do_not_depend_on_row_order(m, d, h):
    """The tensor-core gate kernel spreads a block's 16 rows over the layer (hot-first layers): a neuron's h is
    the same bits wherever its row sits, so permuting the rows permutes h and nothing else; the decode kernel from
    the activation likewise (its segments are spread over a token's blocks)."""
    inp = make_ffn_inputs(m, d, h, max(0.05 * h, 0.5), device=DEV, seed=m + h)
    perm = torch.randperm(h, generator=torch.Generator().manual_seed(h)).to(DEV)
    h1 = launchers.launch_decode_gate_up(inp.x, inp.gate, inp.up, impl="mma")
    h2 = launchers.launch_decode_gate_up(inp.x, inp.gate[perm].contiguous(), inp.up[perm].contiguous(), impl="mma")
    torch.cuda.synchronize()
    assert (h1[:, :h] != 0).any()
    assert torch.equal(h1[:, :h][:, perm], h2[:, :h])
    act = inp.x @ inp.gate.T
    u1 = launchers.launch_decode_up_act(inp.x, act, inp.up)
    u2 = launchers.launch_decode_up_act(inp.x, act[:, perm].contiguous(), inp.up[perm].contiguous())
    torch.cuda.synchronize()
    assert torch.equal(u1[:, :h][:, perm], u2[:, :h])


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("gated", [True, False])
def test_fused_decode_bitwise_equals_gemv_and_decode_kernel(m, gated):
    """Same rounding of a, same h, same list order and down sums: the fused path on CUDA cores equals gemv +
    decode kernel."""
    inp = make_ffn_inputs(m, 2048, 5632, 28, device=DEV, seed=m + 70)
    down_t = inp.down.T.contiguous()
    up = inp.up if gated else None
    fused = torch.empty_like(inp.x)
    launchers.launch_decode_ffn(inp.x, inp.gate, up, down_t, fused, impl="gemv")
    unfused = ops.relu_ffn(inp.x, ops.gemv(inp.x, inp.gate), up, down_t)
    assert torch.equal(fused, unfused)


# decode_up_act_kernel's builds (the launcher picks the first for rows too wide for x in shared memory, else one of
# the last two by the grid; tests/gpu/decode_breakdown.py times all three): the same bits as the default
UP_ACT_BUILDS = [launchers.UP_ACT_X_FROM_L1, launchers.UP_ACT_ONE_PER_SM, launchers.UP_ACT_TWO_PER_SM]


@pytest.mark.parametrize("m", [1, 5, 17, 33, 64])
@pytest.mark.parametrize("d,h", [(2048, 5632), (256, 1000), (64, 33)])
@pytest.mark.parametrize("density", [0.3, 0.02, 0.005])
@pytest.mark.parametrize("gated", [True, False])
def test_decode_from_act_bitwise_equals_twell_decode(m, d, h, density, gated):
    """The decode path from a dense activation (h of the active pairs, then the down rows) sums the same products
    in the same order as the TwELL decode kernel: equal bit for bit, with and without programmatic dependent
    launch. Density 0.3 overflows TwELL tiles (read back from act exactly) and gives a block more active pairs
    than one batch of up dots holds (DECODE_UP_CAP)."""
    inp = make_ffn_inputs(m, d, h, max(density * h, 0.5), device=DEV, seed=m * 13 + d + h)
    down_t = inp.down.T.contiguous()
    up = inp.up if gated else None
    act = inp.x @ inp.gate.T
    want = _poison(torch.empty_like(inp.x))
    launchers.launch_twell_ffn(inp.x, ops.twell_pack(act, 256, 32), up, down_t, act, want, 256, path="decode")
    pdl_options = [(False, False)]
    if launchers.pdl_default(torch.device(DEV)):
        pdl_options += [(True, False), (True, True)]
    outs = []
    for pdl, pdl_up in pdl_options:
        for seg_lists in (True, False):  # the down kernel's entries from the segment lists, or from the h row
            outs.append(_poison(torch.empty_like(inp.x)))
            launchers.launch_relu_ffn(inp.x, act, up, down_t, outs[-1], path="decode", pdl=pdl, pdl_up=pdl_up,
                                      seg_lists=seg_lists)
    torch.cuda.synchronize()
    assert not torch.isnan(want).any()
    for out in outs:
        assert torch.equal(out, want)
    # the segment lists the up-dot kernel hands the down kernel
    seg = launchers.decode_seg_buffers(m, h, inp.x.device)
    h_default = launchers.launch_decode_up_act(inp.x, act, up, seg=seg)
    torch.cuda.synchronize()
    nz = h_default[:, :h] != 0  # the lists hold what the down kernel lists from h: counts, then entries in order
    ns = seg[0].shape[1]
    padded = torch.zeros(m, ns * launchers.FUSED_SEG, dtype=torch.bool, device=DEV)
    padded[:, :h] = nz
    assert torch.equal(seg[0], padded.view(m, ns, -1).sum(2, dtype=torch.int32))
    per_seg = padded.view(m, ns, launchers.FUSED_SEG)
    rank = per_seg.cumsum(2) - 1  # an entry's place in its segment's list
    t_i, g_i, c_i = torch.nonzero(per_seg & (rank < launchers.DECODE_SEG_CAP), as_tuple=True)
    got = seg[1][t_i, g_i, rank[t_i, g_i, c_i]]
    cols = g_i * launchers.FUSED_SEG + c_i
    assert torch.equal(got[:, 0], cols.to(torch.int32))
    assert torch.equal(got[:, 1].contiguous().view(torch.float32), h_default[t_i, cols])
    # the up-dot kernel's builds: x as fp32 in shared memory, one dot per warp (default), or two per warp from L1
    for build in UP_ACT_BUILDS:
        assert torch.equal(launchers.launch_decode_up_act(inp.x, act, up, defines=build)[:, :h], h_default[:, :h])


def test_decode_from_act_hot_segment_and_nan():
    """All of a token's active neurons in one 256-column segment (hot-first order does that): the block's warps
    share the up dots; NaN in the activation counts as active and propagates to its token only."""
    m, d, h = 40, 512, 2048
    inp = make_ffn_inputs(m, d, h, 5, device=DEV, seed=4)
    down_t = inp.down.T.contiguous()
    act = -(inp.x @ inp.gate.T).abs() - 0.01
    act[:, 256:300] = act[:, 256:300].abs()  # 44 active neurons per token, all in segment 1
    act[7, 1000] = float("nan")
    out = _poison(torch.empty_like(inp.x))
    launchers.launch_relu_ffn(inp.x, act, inp.up, down_t, out, path="decode")
    torch.cuda.synchronize()
    keep = torch.arange(m, device=DEV) != 7
    assert torch.isnan(out[7]).all() and not torch.isnan(out[keep]).any()
    a16 = torch.relu(act[:, 256:300])
    want = (a16.float() * (inp.x.float() @ inp.up[256:300].float().T)) @ down_t[256:300].float()
    assert _rel(out[keep], want[keep]) < 1e-2


def _assert_pdl_chain_matches_plain(chain, side_stream: bool = False) -> None:
    """chain(pdl) runs a chain of layers and returns its last output: with PDL it must equal the plain launches
    bit for bit, eagerly (and, with side_stream, run once on a side stream), then as a CUDA graph replayed three
    times with its output poisoned in between."""
    want = chain(False)
    torch.cuda.synchronize()
    assert torch.isfinite(want).all()
    assert torch.equal(chain(True), want)
    if side_stream:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            chain(True)
        torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        got = chain(True)
    for _ in range(3):
        got.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)


def _needs_pdl():
    if not launchers.pdl_default(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs sm_90 or newer")


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("gated", [True, False])
def test_fused_decode_pdl_same_bits_as_plain_launch(m, gated):
    """Programmatic dependent launch changes when the down kernel starts, not what it computes."""
    _needs_pdl()
    inp = make_ffn_inputs(m, 2048, 5632, 28, device=DEV, seed=m + 90)
    down_t = inp.down.T.contiguous()
    up = inp.up if gated else None
    outs = []
    for pdl in (False, True, True):
        out = _poison(torch.empty_like(inp.x))
        launchers.launch_decode_ffn(inp.x, inp.gate, up, down_t, out, pdl=pdl)
        outs.append(out)
    torch.cuda.synchronize()
    assert not torch.isnan(outs[0]).any()
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


@pytest.mark.parametrize("m", [1, 8])
def test_fused_decode_pdl_waits_for_its_inputs(m):
    """Launched early, the down kernel still waits for the h it reads: a chain of layers (x of the first made by
    a long matmul just before; each later x the previous layer's out, so h buffers are reused by the allocator
    while the kernels before may still run), eager and as CUDA-graph replays poisoned in between, equal bit for
    bit to the chain launched without PDL."""
    _needs_pdl()
    d, h, layers = 1024, 2816, 6
    sets = [make_ffn_inputs(m, d, h, 14, device=DEV, seed=200 + i) for i in range(layers)]
    downs_t = [s.down.T.contiguous() for s in sets]
    big = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16) / 64

    def chain(pdl):
        x = (big @ big)[:m, :d].contiguous() + sets[0].x  # a ~0.1 ms kernel makes part of x
        for i, (s, dt) in enumerate(zip(sets, downs_t)):
            out = torch.empty_like(x)
            launchers.launch_decode_ffn(x, s.gate, s.up, dt, out, pdl=pdl)
            # even layers feed the next gate kernel directly; odd ones rescale (so some neurons stay active)
            x = out if i % 2 == 0 else out * (m * d) ** 0.5 / (out.float().norm() + 1e-6)
        return x

    _assert_pdl_chain_matches_plain(chain, side_stream=True)


@pytest.mark.parametrize("m", [17, 64])
def test_decode_from_act_pdl_waits_after_cublas(m):
    """Both kernels of the decode path from the activation launched with PDL after the cuBLAS gate GEMM, in a chain of layers
    (each x the previous out), eager and as poisoned CUDA-graph replays: equal bit for bit to plain launches."""
    _needs_pdl()
    d, h, layers = 1024, 2816, 6
    sets = [make_ffn_inputs(m, d, h, 14, device=DEV, seed=300 + i) for i in range(layers)]
    downs_t = [s.down.T.contiguous() for s in sets]

    def chain(pdl):
        x = sets[0].x
        for i, (s, dt) in enumerate(zip(sets, downs_t)):
            out = torch.empty_like(x)
            launchers.launch_relu_ffn(x, x @ s.gate.T, s.up, dt, out, path="decode", pdl=pdl, pdl_up=pdl)
            x = out * (m * d) ** 0.5 / (out.float().norm() + 1e-6)
        return x

    _assert_pdl_chain_matches_plain(chain)


def test_fused_decode_nan_and_shape_errors():
    inp = make_ffn_inputs(2, 256, 512, 5, device=DEV, seed=3)
    down_t = inp.down.T.contiguous()
    x = inp.x.clone()
    x[1, 0] = float("nan")  # token 1: every a is NaN -> counts as active, NaN propagates; token 0 untouched
    out = ops.decode_ffn(x, inp.gate, inp.up, down_t)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    with pytest.raises(ValueError, match="1..16 tokens"):
        launchers.launch_decode_ffn(inp.x.repeat(9, 1), inp.gate, inp.up, down_t,
                                    torch.empty(18, 256, dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="CUDA-core gate kernel handles 1..8 tokens"):
        launchers.launch_decode_ffn(inp.x.repeat(5, 1), inp.gate, inp.up, down_t,
                                    torch.empty(10, 256, dtype=torch.bfloat16, device=DEV), impl="gemv")
    with pytest.raises(ValueError, match="w_act must have shape"):
        launchers.launch_decode_ffn(inp.x, inp.gate[:, :128].contiguous(), inp.up, down_t, torch.empty_like(inp.x))


def test_fused_decode_in_graph_and_ffn_forward_routing(monkeypatch):
    """ffn_forward with a density hint and <= 8 tokens runs the fused op (eagerly with mode=sparse, and under a
    CUDA graph with mode=auto); the replay equals the eager call."""
    from sparsify_cli.kernels import ffn

    inp = make_ffn_inputs(4, 1024, 2816, 20, device=DEV, seed=12)
    down_t = inp.down.T.contiguous()
    calls = []
    real = ops.decode_ffn
    monkeypatch.setattr(ops, "decode_ffn", lambda *a: calls.append(1) or real(*a))
    eager = ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="sparse", kernels="cuda", nnz_hint=20.0)
    assert calls == [1]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="auto", kernels="cuda", nnz_hint=20.0)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="auto", kernels="cuda", nnz_hint=20.0)
    g.replay()
    torch.cuda.synchronize()
    assert len(calls) == 2  # eager mode=sparse and the capture (the eager mode=auto warm-up goes dense)
    assert torch.equal(captured, eager)
    # the switch: without fused_decode the gate projection + decode kernel run instead
    calls.clear()
    ffn.ffn_forward(inp.x, inp.gate, inp.up, down_t, mode="sparse", kernels="cuda", nnz_hint=20.0,
                    policy=ffn.SparsePolicy(fused_decode=False))
    assert calls == []
