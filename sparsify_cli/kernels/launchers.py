"""Launchers: check shapes/dtypes/layout (clear ValueError), pick the kernel instance, compute the grid, launch.

These write into caller-provided outputs (the torch.library ops in ops.py allocate them); only the scratch one
kernel hands the next within a path (the h values, the decode segment lists) is allocated here.
All launches go to torch's current stream (loader.launch).
"""

from __future__ import annotations

import torch

PACK_WARPS = 8  # warps (= (token, tile) pairs) per block
FFN_WARPS = 4  # warps (= tokens) per block, prefill kernel; must match kernels_cu/twell_ffn.cu
FFN_CHUNK = 2048  # widest D-chunk one warp accumulates in registers
UP_WARPS = 4  # warps (= tokens) per block of twell_up_kernel; must match kernels_cu/twell_ffn.cu
FFN_CAP = 1024  # entries one warp of the prefill kernel lists per batch; must match kernels_cu/twell_ffn.cu
# Compile-time variants of the prefill kernel used by default, chosen from bench_results/ (BENCHMARKS.md):
# 16 instead of 12 warps per SM (128 registers, a few bytes of spills in the gather) measured faster.
FFN_DEFAULT_DEFINES: tuple[str, ...] = ("FFN_MIN_BLOCKS=4",)
FFN_DEFAULT_SPLIT = False  # run phase A (x . U_j) as its own kernel (twell_up_kernel)
DECODE_MAX_M = 64  # at or below this many tokens the decode kernel runs
DECODE_THREADS = 512  # must match kernels_cu/decode_down.cuh
DECODE_CAP = 1024  # must match kernels_cu/decode_down.cuh
MAX_HIDDEN = 65536  # column index is 16 bits


def n_tiles(hidden: int, tile: int) -> int:
    return (hidden + tile - 1) // tile


def check_tile(tile: int, slots: int) -> None:
    if not (32 <= tile <= 1024 and tile % 32 == 0):
        raise ValueError(f"tile must be a multiple of 32 in [32, 1024], got {tile}")
    if not (2 <= slots <= tile):
        raise ValueError(f"slots must be in [2, tile={tile}] (count + at least one entry), got {slots}")


def _check(t: torch.Tensor | None, name: str, dtype: torch.dtype, shape: tuple[int, ...], device) -> None:
    if t is None:
        raise ValueError(f"{name} is required")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (row-major)")


def _check_aligned(**tensors: torch.Tensor | None) -> None:
    """The kernels load 16-byte vectors: each given tensor (None: absent, skipped) must start 16-byte aligned."""
    for name, t in tensors.items():
        if t is not None and t.data_ptr() % 16 != 0:
            raise ValueError(f"{name} must be 16-byte aligned (data_ptr % 16 == 0)")


def _check_lists(lists: torch.Tensor, m: int, device) -> None:
    """The hybrid's cold list (M, S) int32: a count and S - 1 <= FFN_CAP words per row (the prefill kernel scans
    act instead for a row whose list is longer than its per-warp list, FFN_ACT_CAP = 512 entries by default)."""
    if lists.dim() != 2 or not 2 <= lists.shape[1] <= FFN_CAP + 1:
        raise ValueError(f"lists must be (M, S) with 2 <= S <= {FFN_CAP + 1}, got shape {tuple(lists.shape)}")
    _check(lists, "lists", torch.int32, (m, lists.shape[1]), device)


def check_pack_args(act: torch.Tensor, words: torch.Tensor, tile: int, slots: int) -> None:
    check_tile(tile, slots)
    if act.dim() != 2:
        raise ValueError(f"act must be 2-D (M, H), got shape {tuple(act.shape)}")
    m, h = act.shape
    if h > MAX_HIDDEN:
        raise ValueError(f"H={h} exceeds {MAX_HIDDEN}: TwELL column indices are 16-bit")
    _check(act, "act", torch.bfloat16, (m, h), act.device)
    _check(words, "words", torch.int32, (m, n_tiles(h, tile), slots), act.device)
    if act.device.type != "cuda":
        raise ValueError(f"act must be a CUDA tensor, got {act.device}")


def check_ffn_args(x, words, up, down_t, act, out, tile: int) -> tuple[int, int, int, int, int]:
    """Validate the FFN launchers' arguments (words may be None for the kernels that read act only);
    returns (M, D, H, n_tiles, slots)."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (M, D), got shape {tuple(x.shape)}")
    m, d = x.shape
    if d % 64 != 0 or d == 0:
        raise ValueError(f"D={d} must be a positive multiple of 64")
    if down_t.dim() != 2:
        raise ValueError(f"down_t must be 2-D (H, D), got shape {tuple(down_t.shape)}")
    h = down_t.shape[0]
    if h > MAX_HIDDEN:
        raise ValueError(f"H={h} exceeds {MAX_HIDDEN}: TwELL column indices are 16-bit")
    if words is not None and words.dim() != 3:
        raise ValueError(f"words must be 3-D (M, n_tiles, slots), got shape {tuple(words.shape)}")
    nt, s = n_tiles(h, tile), (words.shape[2] if words is not None else 2)
    check_tile(tile, s)
    dev = x.device
    if dev.type != "cuda":
        raise ValueError(f"x must be a CUDA tensor, got {dev}")
    _check(x, "x", torch.bfloat16, (m, d), dev)
    if words is not None:
        _check(words, "words", torch.int32, (m, nt, s), dev)
    if up is not None:
        _check(up, "up", torch.bfloat16, (h, d), dev)
    _check(down_t, "down_t", torch.bfloat16, (h, d), dev)
    _check(act, "act", torch.bfloat16, (m, h), dev)
    _check(out, "out", torch.bfloat16, (m, d), dev)
    _check_aligned(x=x, up=up, down_t=down_t, out=out)
    return m, d, h, nt, s


def _i32(v: int):
    import numpy as np

    return np.int32(v)


def _i64(v: int):
    import numpy as np

    return np.int64(v)


def launch_twell_pack(act: torch.Tensor, words: torch.Tensor, tile: int, slots: int) -> None:
    """relu + TwELL pack: act (M, H) bf16 -> words (M, ceil(H/tile), slots) int32 (written fully)."""
    from sparsify_cli.kernels import loader

    check_pack_args(act, words, tile, slots)
    m, h = act.shape
    nt = n_tiles(h, tile)
    if m == 0:
        return
    epl = tile // 32
    vec_ok = int(h % 8 == 0 and act.data_ptr() % 16 == 0)
    fn = loader.get_function("twell_pack.cu", f"twell_pack_kernel<{epl}>")
    pairs = m * nt
    grid = ((pairs + PACK_WARPS - 1) // PACK_WARPS,)
    args = (act.data_ptr(), words.data_ptr(), _i64(m), _i32(h), _i32(nt), _i32(slots), _i32(vec_ok))
    loader.launch(fn, grid, (32 * PACK_WARPS,), args)


RELU_MUL_THREADS = 256  # must match kernels_cu/relu_mul.cu


def launch_relu_mul(a: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> None:
    """h = relu(a) * u, bf16, one rounding (the values of torch's relu then multiply): a is the first N columns
    of the activation, a (M, N) view with unit column stride and any row stride (act[:, :n_hot]); u, h (M, N)."""
    from sparsify_cli.kernels import loader

    if a.dim() != 2:
        raise ValueError(f"a must be 2-D (M, N), got shape {tuple(a.shape)}")
    m, n = a.shape
    if a.dtype != torch.bfloat16:
        raise ValueError(f"a must be torch.bfloat16, got {a.dtype}")
    if (n > 1 and a.stride(1) != 1) or (m > 1 and a.stride(0) < n):
        raise ValueError(f"a must be a row-major view (unit column stride), got strides {a.stride()}")
    _check(u, "u", torch.bfloat16, (m, n), a.device)
    _check(h, "h", torch.bfloat16, (m, n), a.device)
    if a.device.type != "cuda":
        raise ValueError(f"a must be a CUDA tensor, got {a.device}")
    if m == 0 or n == 0:
        return
    lda = a.stride(0) if m > 1 else n
    vec = int(n % 8 == 0 and lda % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in (a, u, h)))
    groups = m * ((n + 7) // 8)
    fn = loader.get_function("relu_mul.cu", "relu_mul_kernel")
    loader.launch(fn, ((groups + RELU_MUL_THREADS - 1) // RELU_MUL_THREADS,), (RELU_MUL_THREADS,),
                  (a.data_ptr(), _i64(lda), u.data_ptr(), h.data_ptr(), _i64(m), _i32(n), _i32(vec)))


LIST_WARPS = 8  # must match kernels_cu/relu_list.cu
LIST_SLOTS = 64  # int32 per token in the hybrid's cold list: its count and up to 63 words (256 bytes)


def launch_relu_list(act: torch.Tensor, c_start: int, u: torch.Tensor | None, h: torch.Tensor,
                     lists: torch.Tensor, defines: tuple[str, ...] = ()) -> None:
    """The hybrid's pass over the activation (kernels_cu/relu_list.cu): h = relu(a) * u over the hot columns
    [0, c_start) (u None: h = relu(a)), and each row's relu-active cold columns [c_start, H) listed into
    lists (M, S) int32: the true count, then up to S - 1 words (column << 16 | bf16 bits) in ascending order.
    A row with more entries keeps its count, and launch_relu_ffn(lists=) scans it from act instead.
    ``defines``: a tuning build (e.g. ``("LIST_STEP=8",)``), the same results."""
    from sparsify_cli.kernels import loader

    if act.dim() != 2:
        raise ValueError(f"act must be 2-D (M, H), got shape {tuple(act.shape)}")
    m, h_width = act.shape
    _check(act, "act", torch.bfloat16, (m, h_width), act.device)
    if h_width > MAX_HIDDEN:
        raise ValueError(f"H={h_width} exceeds {MAX_HIDDEN}: list column indices are 16-bit")
    if not (0 <= c_start <= h_width and c_start % 8 == 0):
        raise ValueError(f"c_start must be a multiple of 8 in [0, H={h_width}], got {c_start}")
    if u is not None:
        _check(u, "u", torch.bfloat16, (m, c_start), act.device)
    _check(h, "h", torch.bfloat16, (m, c_start), act.device)
    _check_lists(lists, m, act.device)
    if act.device.type != "cuda":
        raise ValueError(f"act must be a CUDA tensor, got {act.device}")
    if m == 0:
        return
    vec = int(h_width % 8 == 0 and all(t.data_ptr() % 16 == 0 for t in (act, h) + ((u,) if u is not None else ())))
    fn = loader.get_function("relu_list.cu", "relu_list_kernel", defines)
    loader.launch(fn, ((m + LIST_WARPS - 1) // LIST_WARPS,), (32 * LIST_WARPS,),
                  (act.data_ptr(), u.data_ptr() if u is not None else 0, h.data_ptr() if c_start else 0,
                   lists.data_ptr(), _i64(m), _i32(h_width), _i32(c_start), _i32(lists.shape[1]), _i32(vec)))


def _b(v: bool) -> str:
    return "true" if v else "false"


def ffn_instance(d: int, gated: bool, from_act: bool = False, hbuf: bool = False) -> tuple[str, int, int]:
    """(kernel expression, chunk width, number of chunks) of the prefill kernel for this D."""
    nv = (d + 255) // 256 if d <= FFN_CHUNK else FFN_CHUNK // 256
    dc = 256 * nv
    expr = f"twell_ffn_kernel<{nv}, {_b(gated)}, {_b(from_act)}, {_b(hbuf)}>"
    return expr, dc, (d + dc - 1) // dc


def _vec_ok(act: torch.Tensor) -> int:
    return int(act.shape[1] % 8 == 0 and act.data_ptr() % 16 == 0)


DECODE_MAX_CHUNKS = 8  # blocks per token in the decode kernel (D split for the down projection)
DECODE_TARGET_BLOCKS = 132  # about one block per SM (H100): more chunks only repeat the up dots


def decode_chunks(d: int, m: int = 1) -> tuple[int, int]:
    """(chunks, vectors per chunk rounded up to 32) for the decode kernel: every chunk block repeats the
    token's up dots, so split D only while the grid (m * chunks) is under ~one block per SM; at most
    DECODE_MAX_CHUNKS chunks of >= 32 column vectors, and chunks of at most DECODE_THREADS / 2 vectors."""
    nvec = d // 8
    c = max(1, min(DECODE_MAX_CHUNKS, nvec // 32, DECODE_TARGET_BLOCKS // max(m, 1)))
    c = max(c, -(-nvec // (DECODE_THREADS // 2)))
    cv = -(-nvec // c)
    return c, -(-cv // 32) * 32


def decode_smem(n_lists: int, cvr: int) -> int:
    """Dynamic shared memory of a decode down-phase block (decode_down.cuh): n_lists + 1 list offsets, the entry
    batch (DECODE_CAP columns and values), the chunk's fp32 row (cvr * 8) and the per-group partials."""
    return (n_lists + 1 + 2 * DECODE_CAP) * 4 + cvr * 8 * 4 + DECODE_THREADS * 8 * 4


def _allow_smem(fn, smem: int, what: str, d: int, h: int) -> None:
    """Let ``fn`` use ``smem`` bytes of dynamic shared memory (above the 48 KB default), or refuse with the reason."""
    if smem > 227 * 1024:
        raise ValueError(f"{what}: D={d}, H={h} need {smem} bytes of shared memory (> 227 KB)")
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem


def _decode_launch(x, words, up, down_t, act, out, tile, m, d, h, nt, s) -> None:
    """The TwELL decode kernel (twell_decode.cu): one block per token and D-chunk."""
    from sparsify_cli.kernels import loader

    fn = loader.get_function("twell_decode.cu", f"twell_decode_kernel<{_b(up is not None)}>")
    chunks, cvr = decode_chunks(d, m)
    smem = decode_smem(nt, cvr)
    _allow_smem(fn, smem, "decode path", d, h)
    ptrs = (x.data_ptr(), words.data_ptr(), up.data_ptr() if up is not None else 0, down_t.data_ptr(),
            act.data_ptr(), out.data_ptr())
    tail = (_i64(m), _i32(d), _i32(h), _i32(nt), _i32(s), _i32(tile), _i32(_vec_ok(act)))
    loader.launch(fn, (m, chunks), (DECODE_THREADS,), ptrs + tail, shared_mem=smem)


def _prefill_launch(x, words, up, down_t, act, out, tile, from_act: bool, defines, m, d, h, nt, s,
                    split: bool = False, c_start: int = 0, init: torch.Tensor | None = None) -> None:
    from sparsify_cli.kernels import loader

    if defines is None:
        defines = FFN_DEFAULT_DEFINES
    hbuf = None
    if split and up is not None and not from_act:
        hbuf = torch.empty(m, nt, s, dtype=torch.float32, device=x.device)  # only stored slots are written
        fn_up = loader.get_function("twell_ffn.cu", "twell_up_kernel", defines)
        loader.launch(fn_up, ((m + UP_WARPS - 1) // UP_WARPS,), (32 * UP_WARPS,),
                      (x.data_ptr(), words.data_ptr(), up.data_ptr(), hbuf.data_ptr(), _i64(m), _i32(d), _i32(nt),
                       _i32(s)))
    expr, _, chunks = ffn_instance(d, up is not None, from_act, hbuf is not None)
    fn = loader.get_function("twell_ffn.cu", expr, defines)
    ptrs = (x.data_ptr(), words.data_ptr() if words is not None else 0, up.data_ptr() if up is not None else 0,
            down_t.data_ptr(), act.data_ptr(), out.data_ptr())
    tail = (_i64(m), _i32(d), _i32(h), _i32(nt), _i32(s), _i32(tile), _i32(_vec_ok(act)),
            hbuf.data_ptr() if hbuf is not None else 0, _i32(c_start), init.data_ptr() if init is not None else 0)
    loader.launch(fn, ((m + FFN_WARPS - 1) // FFN_WARPS, chunks), (32 * FFN_WARPS,), ptrs + tail)


def launch_relu_ffn(x, act, up, down_t, out, *, path: str = "auto", tile: int = 256,
                    defines: tuple[str, ...] | None = None, c_start: int = 0,
                    init: torch.Tensor | None = None, pdl: bool | None = None, pdl_up: bool | None = None,
                    lists: torch.Tensor | None = None, seg_lists: bool = True) -> None:
    """The sparse FFN without materializing TwELL: each token's entries come straight from the dense activation
    ``act`` (relu applied; packing fused into the FFN kernel). Reads only the active rows of U and DownT.
    path: auto (decode kernels for M <= DECODE_MAX_M, else prefill) | prefill | decode.
    Hybrid (prefill only): only columns >= ``c_start`` are used (a multiple of 8), and ``init`` (M, D) bf16 is
    added to the result (the hot neurons' dense part). ``lists`` (prefill only): the rows' entries as
    launch_relu_list listed them from this act and c_start, read instead of scanning act (rows that overflowed
    their list are still scanned). The results are the same bits with and without it.
    Decode runs two kernels (launch_decode_up_act, then launch_decode_down); ``pdl`` launches the second and
    ``pdl_up`` the first with programmatic dependent launch (None: pdl_default); ``seg_lists``: the first hands the
    second its entries as segment lists (decode_seg_buffers) instead of only the dense h row. The results are the
    same bits."""
    if act.dim() != 2 or x.dim() != 2:
        raise ValueError("x and act must be 2-D: x (M, D), act (M, H)")
    m, d, h, nt, _ = check_ffn_args(x, None, up, down_t, act, out, tile)
    hybrid = c_start != 0 or init is not None
    if not (0 <= c_start <= h and c_start % 8 == 0):
        raise ValueError(f"c_start must be a multiple of 8 in [0, H={h}], got {c_start}")
    if init is not None:
        _check(init, "init", torch.bfloat16, (m, d), x.device)
        _check_aligned(init=init)
    if lists is not None:
        _check_lists(lists, m, x.device)
    if m == 0:
        return
    if path == "auto":
        path = "prefill" if hybrid or lists is not None or m > DECODE_MAX_M else "decode"
    if path == "decode":
        if hybrid or lists is not None:
            raise ValueError("the decode kernels have no hybrid mode (c_start/init/lists); use path='prefill'")
        default = pdl_default(x.device)
        seg = decode_seg_buffers(m, h, x.device) if seg_lists else None
        hbuf = launch_decode_up_act(x, act, up, pdl=default if pdl_up is None else pdl_up, seg=seg)
        launch_decode_down(hbuf, down_t, out, h, pdl=default if pdl is None else pdl, seg=seg)
    elif path == "prefill":
        s = lists.shape[1] if lists is not None else 2
        _prefill_launch(x, lists, up, down_t, act, out, tile, True, defines, m, d, h, nt, s, False, c_start, init)
    else:
        raise ValueError(f"path must be auto, prefill or decode, got {path!r}")


def launch_twell_ffn(x, words, up, down_t, act, out, tile: int, *, path: str = "auto",
                     defines: tuple[str, ...] | None = None, split: bool | None = None) -> None:
    """out = sparse FFN up/down from TwELL words (gated when ``up`` is given). path: auto | prefill | decode.
    Tuning variants of the prefill kernel: ``defines`` (e.g. ``("FFN_MIN_BLOCKS=3",)``; None = the default),
    ``split`` (phase A in its own kernel; None = FFN_DEFAULT_SPLIT)."""
    m, d, h, nt, s = check_ffn_args(x, words, up, down_t, act, out, tile)
    if m == 0:
        return
    if path == "auto":
        path = "decode" if m <= DECODE_MAX_M else "prefill"
    if path == "decode":
        _decode_launch(x, words, up, down_t, act, out, tile, m, d, h, nt, s)
    elif path == "prefill":
        _prefill_launch(x, words, up, down_t, act, out, tile, False, defines, m, d, h, nt, s,
                        FFN_DEFAULT_SPLIT if split is None else split)
    else:
        raise ValueError(f"path must be auto, prefill or decode, got {path!r}")


def _check_few_tokens(x: torch.Tensor, w: torch.Tensor, w_name: str, what: str, max_m: int,
                      d_multiple: int) -> tuple[int, int, int, torch.device]:
    """The shape checks shared by the small-M launchers: x (M, D) with 1 <= M <= max_m and D a positive multiple
    of d_multiple, w (H, D), x on a GPU. Returns M, D, H and the device."""
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"x and {w_name} must be 2-D: x (M, D), {w_name} (H, D)")
    m, d = x.shape
    if not 1 <= m <= max_m:
        raise ValueError(f"{what} handles 1..{max_m} tokens, got M={m}")
    if d <= 0 or d % d_multiple != 0:
        raise ValueError(f"D={d} must be a positive multiple of {d_multiple}")
    if x.device.type != "cuda":
        raise ValueError(f"x must be a CUDA tensor, got {x.device}")
    return m, d, w.shape[0], x.device


GEMV_MAX_M = 2  # tokens the gemv kernel handles (templates in kernels_cu/gemv.cu)
GEMV_WARPS = 4  # must match __launch_bounds__ in kernels_cu/gemv.cu
GEMV_ROWS = 4  # rows of w per warp


def launch_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, rows: int | None = None) -> None:
    """out = x · wᵀ for M <= GEMV_MAX_M tokens: x (M, D), w (H, D), out (M, H), bf16 (fp32 sums, one rounding)."""
    from sparsify_cli.kernels import loader

    m, d, h, dev = _check_few_tokens(x, w, "w", "gemv", GEMV_MAX_M, 8)
    _check(x, "x", torch.bfloat16, (m, d), dev)
    _check(w, "w", torch.bfloat16, (h, d), dev)
    _check(out, "out", torch.bfloat16, (m, h), dev)
    _check_aligned(x=x, w=w)
    if rows is None:
        rows = GEMV_ROWS if m == 1 else 2  # <2, 4> would spill (20 bytes at 168 registers)
    fn = loader.get_function("gemv.cu", f"gemv_kernel<{m}, {rows}>")
    rows_per_block = rows * GEMV_WARPS
    loader.launch(fn, ((h + rows_per_block - 1) // rows_per_block,), (32 * GEMV_WARPS,),
                  (x.data_ptr(), w.data_ptr(), out.data_ptr(), _i32(d), _i32(h)))


# Tokens the fused decode path handles (decode_fused.cu: one or two 8-token tiles per tensor-core block) and up to
# which ffn_forward takes it (SparsePolicy.takes_fused_decode). Four tiles (M <= 32) lost to the unfused path at 32
# tokens (1.43x against 1.58x dense, BENCHMARKS.md); two win at 16 at every measured density.
FUSED_MAX_M = 16
FUSED_GEMV_MAX_M = 8  # the CUDA-core gate kernel's instances (decode_gate_up_kernel<MT, ...>)
FUSED_GATE_WARPS = 4  # must match kernels_cu/decode_fused.cu
FUSED_SEG = 256  # must match kernels_cu/decode_fused.cu (listing segment of the down kernel)
FUSED_DEFAULT_DEFINES: tuple[str, ...] = ()
FUSED_MMA_MIN_M = 2  # from this many tokens the gate-up kernel uses tensor cores (CUDA cores: M = 8 took 3x cuBLAS)
FUSED_MMA_ROWS = 16  # gate rows per block of decode_gate_up_mma_kernel


def mma_tiles(m: int) -> int:
    """8-token tiles per block of the tensor-core gate kernel for m tokens: 1 or 2 (its instances)."""
    return 1 if m <= 8 else 2


def fused_rows(m: int) -> int:
    """Gate rows per warp of the CUDA-core decode_gate_up_kernel: 4 for one token (one wave of warps at H = 5632,
    as gemv.cu); 2 above (4 rows x m tokens would spill: nvcc -Xptxas -v, 168 registers)."""
    return 4 if m == 1 else 2


def pdl_default(device: torch.device) -> bool:
    """Whether the fused decode path launches its down kernel with programmatic dependent launch by default: on
    sm_90 and newer (the griddepcontrol instructions are Hopper's)."""
    from sparsify_cli.kernels import loader

    return loader.capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)


def launch_decode_ffn(x: torch.Tensor, w_act: torch.Tensor, up: torch.Tensor | None, down_t: torch.Tensor,
                      out: torch.Tensor, *, rows: int | None = None, defines: tuple[str, ...] | None = None,
                      impl: str = "auto", pdl: bool | None = None) -> torch.Tensor:
    """The whole sparse FFN block for 1..FUSED_MAX_M tokens in two kernels (kernels_cu/decode_fused.cu): the gate
    projection, relu and the active neurons' up dots in one pass over the gate weight, then the down rows of the
    active neurons. x (M, D), w_act (H, D) (gate; plain FFN: up weight), up (H, D) or None, down_t (H, D),
    out (M, D); bf16, fp32 sums. Returns the (M, Hs) fp32 scratch of h values (for tests). impl: the gate
    kernel's (launch_decode_gate_up). pdl: launch the down kernel with programmatic dependent launch (None:
    pdl_default), so its launch overlaps the gate kernel (-0.4 to -1.0 us per call on an H100, BENCHMARKS.md);
    the result is the same bits. The gate kernel launches ordinarily: launched early as well, it ran slower."""
    m, d, h, dev = _check_few_tokens(x, w_act, "w_act", "the fused decode path", FUSED_MAX_M, 64)
    if h > MAX_HIDDEN:
        raise ValueError(f"H={h} exceeds {MAX_HIDDEN}")
    _check(x, "x", torch.bfloat16, (m, d), dev)
    _check(w_act, "w_act", torch.bfloat16, (h, d), dev)
    if up is not None:
        _check(up, "up", torch.bfloat16, (h, d), dev)
    _check(down_t, "down_t", torch.bfloat16, (h, d), dev)
    _check(out, "out", torch.bfloat16, (m, d), dev)
    _check_aligned(x=x, w_act=w_act, up=up, down_t=down_t, out=out)
    if pdl is None:
        pdl = pdl_default(dev)
    hbuf = launch_decode_gate_up(x, w_act, up, rows=rows, defines=defines, impl=impl)
    launch_decode_down(hbuf, down_t, out, h, defines=defines, pdl=pdl)
    return hbuf


def launch_decode_gate_up(x: torch.Tensor, w_act: torch.Tensor, up: torch.Tensor | None, *, rows: int | None = None,
                          defines: tuple[str, ...] | None = None, impl: str = "auto") -> torch.Tensor:
    """The fused decode path's first kernel (arguments checked by launch_decode_ffn): h (M, Hs) fp32, h = relu(a)·u
    (gated) or relu(a), 0 where inactive; a = x·w_actᵀ rounded to bf16. impl: auto | gemv (CUDA cores) | mma
    (tensor cores); auto = mma from FUSED_MMA_MIN_M tokens."""
    from sparsify_cli.kernels import loader

    m, d = x.shape
    h = w_act.shape[0]
    if impl == "auto":
        impl = "mma" if m >= FUSED_MMA_MIN_M else "gemv"
    if impl not in ("gemv", "mma"):
        raise ValueError(f"impl must be auto, gemv or mma, got {impl!r}")
    if impl == "gemv" and m > FUSED_GEMV_MAX_M:
        raise ValueError(f"the CUDA-core gate kernel handles 1..{FUSED_GEMV_MAX_M} tokens, got M={m}")
    hs = -(-h // 8) * 8  # rows of h padded for 16-byte vector loads
    if impl == "mma":
        hbuf = torch.empty(m, hs, dtype=torch.float32, device=x.device)  # every column < H is written
        nt = mma_tiles(m)
        fn = loader.get_function("decode_fused.cu", f"decode_gate_up_mma_kernel<{_b(up is not None)}, {nt}>",
                                 FUSED_DEFAULT_DEFINES if defines is None else tuple(defines))
        loader.launch(fn, ((h + FUSED_MMA_ROWS - 1) // FUSED_MMA_ROWS,), (32 * FUSED_GATE_WARPS,),
                      (x.data_ptr(), w_act.data_ptr(), up.data_ptr() if up is not None else 0, hbuf.data_ptr(),
                       _i32(m), _i32(d), _i32(h), _i32(hs)))
        return hbuf
    rows = fused_rows(m) if rows is None else rows
    if m * rows > 32:
        raise ValueError(f"rows={rows} x M={m} exceeds one warp (32 lanes)")
    defines = FUSED_DEFAULT_DEFINES if defines is None else tuple(defines)
    hbuf = torch.empty(m, hs, dtype=torch.float32, device=x.device)  # every column < H is written
    fn = loader.get_function("decode_fused.cu", f"decode_gate_up_kernel<{m}, {rows}, {_b(up is not None)}>",
                             defines)
    per_block = rows * FUSED_GATE_WARPS
    loader.launch(fn, ((h + per_block - 1) // per_block,), (32 * FUSED_GATE_WARPS,),
                  (x.data_ptr(), w_act.data_ptr(), up.data_ptr() if up is not None else 0, hbuf.data_ptr(),
                   _i32(d), _i32(h), _i32(hs)))
    return hbuf


DECODE_UP_WARPS = 8  # listing warps (= 256-column segments) per block; must match kernels_cu/decode_fused.cu
# decode_up_act_kernel's builds (kernels_cu/decode_fused.cu): x as fp32 in shared memory, one up dot per warp, with
# 16 warps per block while the grid fits one block per SM, else 12 warps and two blocks per SM (16 warps at two
# blocks per SM would spill). H200, µs per layer, the whole path behind cuBLAS's gate GEMM (BENCHMARKS.md, session
# 20): packed layer (2 blocks per token) 18.4 / 18.9 / 20.3 at 17 / 32 / 64 tokens with 16 warps, 19.0 / 19.5 / 20.8
# with 12, 19.3 / 19.8 / 21.3 before (8 warps, two dots each, x through L1: DECODE_UP_XF=0); full width (3
# blocks per token, 192 at 64 tokens: 1.45 waves at one per SM) 24.0 with 16 warps, 22.1 with 12, 22.7 before.
UP_ACT_ONE_PER_SM: tuple[str, ...] = ()
UP_ACT_TWO_PER_SM: tuple[str, ...] = ("DECODE_UP_DOT_WARPS=12", "DECODE_UP_MIN_BLOCKS=2")
# Wider rows than x as fp32 fits in shared memory (4 D bytes beside the kernel's 2 KB of static shared memory, of
# the 227 KB a block may have: D up to ~57,000) take the build before session 20, which reads x through L1.
UP_ACT_X_FROM_L1: tuple[str, ...] = ("DECODE_UP_XF=0",)
UP_ACT_MAX_X_SMEM = 227 * 1024 - 4096


def up_act_build(blocks: int, d: int, gated: bool, sms: int) -> tuple[str, ...]:
    """decode_up_act_kernel's build for a grid of ``blocks`` blocks on a GPU of ``sms`` SMs, rows of d columns."""
    if gated and 4 * d > UP_ACT_MAX_X_SMEM:  # x as fp32 would not fit in shared memory
        return UP_ACT_X_FROM_L1
    return UP_ACT_ONE_PER_SM if blocks <= sms else UP_ACT_TWO_PER_SM


def _up_act_x_in_smem(defines: tuple[str, ...]) -> bool:
    """Whether a build of decode_up_act_kernel keeps the token's x row in shared memory (DECODE_UP_XF, the default)."""
    return "DECODE_UP_XF=0" not in defines


def decode_up_dot_warps(defines: tuple[str, ...]) -> int:
    """Warps per block of decode_up_act_kernel for a build (kernels_cu/decode_fused.cu's DECODE_UP_DOT_WARPS)."""
    if not _up_act_x_in_smem(defines):
        return DECODE_UP_WARPS
    for d in defines:
        if d.startswith("DECODE_UP_DOT_WARPS="):
            return int(d.split("=", 1)[1])
    return 16


DECODE_SEG_CAP = 32  # entries per segment list; must match kernels_cu/decode_fused.cu


def decode_seg_buffers(m: int, h: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment lists decode_up_act_kernel hands decode_down_kernel: per token and 256-column segment of h, the
    count of its non-zero h (M, NS) int32 and its first DECODE_SEG_CAP entries (M, NS, DECODE_SEG_CAP, 2) int32,
    (column, h's bits) in ascending order. Every count is written; entries past a count are never read."""
    ns = -(-h // FUSED_SEG)
    return (torch.empty(m, ns, dtype=torch.int32, device=device),
            torch.empty(m, ns, DECODE_SEG_CAP, 2, dtype=torch.int32, device=device))


def launch_decode_up_act(x: torch.Tensor, act: torch.Tensor, up: torch.Tensor | None, *,
                         pdl: bool = False, defines: tuple[str, ...] | None = None,
                         seg: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The decode path's first kernel when the gate projection ran elsewhere (launch_relu_ffn checks the
    arguments): h (M, Hs) fp32, h = relu(a)·(x·U_j) (gated) or relu(a), 0 where inactive, Hs = H rounded up to 8;
    launch_decode_down finishes. pdl: launched with programmatic dependent launch (it waits for the previous
    kernel before reading act; after cuBLAS that only hides the launch: -0.2 to -0.4 us, BENCHMARKS.md).
    defines: the kernel's build (None: UP_ACT_ONE_PER_SM if the grid fits one block per SM, else
    UP_ACT_TWO_PER_SM); every build gives the same bits. seg: decode_seg_buffers(M, H) to fill as well."""
    from sparsify_cli.kernels import loader

    m, d = x.shape
    h = act.shape[1]
    hs = -(-h // 8) * 8
    segs = -(-h // FUSED_SEG)
    grid = (m, -(-segs // DECODE_UP_WARPS))  # (token, group of DECODE_UP_WARPS segments)
    if defines is None:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        defines = up_act_build(grid[0] * grid[1], d, up is not None, loader.sm_count(index))
    defines = tuple(defines)
    hbuf = torch.empty(m, hs, dtype=torch.float32, device=x.device)  # every column < H is written
    fn = loader.get_function("decode_fused.cu", f"decode_up_act_kernel<{_b(up is not None)}>", defines)
    warps = decode_up_dot_warps(defines)
    smem = 4 * d if up is not None and _up_act_x_in_smem(defines) else 0  # the x row as fp32
    _allow_smem(fn, smem, "decode up dots", d, h)
    loader.launch(fn, grid, (32 * warps,),
                  (x.data_ptr(), act.data_ptr(), up.data_ptr() if up is not None else 0, hbuf.data_ptr(),
                   *_seg_ptrs(seg), _i32(d), _i32(h), _i32(hs), _i32(_vec_ok(act))), shared_mem=smem, pdl=pdl)
    return hbuf


def _seg_ptrs(seg: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[int, int]:
    return (seg[0].data_ptr(), seg[1].data_ptr()) if seg is not None else (0, 0)


def launch_decode_down(hbuf: torch.Tensor, down_t: torch.Tensor, out: torch.Tensor, h: int, *,
                       defines: tuple[str, ...] | None = None, pdl: bool = False,
                       seg: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """The fused decode path's second kernel: out = h·DownT over the non-zero h of each token (ascending), listed
    from the segment lists ``seg`` that launch_decode_up_act filled (decode_seg_buffers), else from hbuf."""
    from sparsify_cli.kernels import loader

    m, d = out.shape
    defines = FUSED_DEFAULT_DEFINES if defines is None else tuple(defines)
    fn = loader.get_function("decode_fused.cu", "decode_down_kernel", defines)
    chunks, cvr = decode_chunks(d, m)
    smem = decode_smem(-(-h // FUSED_SEG), cvr)
    _allow_smem(fn, smem, "fused decode", d, h)
    loader.launch(fn, (m, chunks), (DECODE_THREADS,),
                  (hbuf.data_ptr(), *_seg_ptrs(seg), down_t.data_ptr(), out.data_ptr(), _i32(d), _i32(h),
                   _i32(hbuf.shape[1])), shared_mem=smem, pdl=pdl)
