"""The Hopper GEMM (kernels_cu/gemm_sm90.cu) from Python: built for sm_90a, fed TMA maps, launched in clusters.

    gate_list(x, w, c_start, slots) -> (act, words)
        act = x·wᵀ (M, N) bf16 and words = the TwELL words (docs/FORMAT.md, tile 256) of relu(act) with the
        columns < c_start left out, from the GEMM's epilogue: the hybrid prefill's gate projection and cold listing
        in one kernel (ffn.gate_listed_hybrid; off by default, SparsePolicy.gate_list_epilogue: measured slower so
        far, BENCHMARKS.md session 18). act is written only where a consumer reads it: the tiles holding
        columns < c_start (the hot glue) and, per 64 rows, the tiles where a row overflowed its K = slots - 1
        entries (the sparse kernel scans act there); elsewhere it is left unwritten.
    matmul(x, w) -> x·wᵀ, every tile written (the same bits as cuBLAS's, BENCHMARKS.md session 18).

Built by loader.get_cubin_function: NVRTC straight to an sm_90a cubin (CuPy's compile path appends plain sm_90,
and wgmma, TMA and setmaxnreg exist only for sm_90a), cached on disk. Launched by loader.launch_ex (the driver's
cuLaunchKernelEx: TMA maps are 128-byte kernel parameters, the cluster shape a launch attribute) on torch's current
stream; the TMA maps are encoded here. Only compute capability 9.0 takes this path (`usable`); everything else
keeps the cuBLAS gate GEMM.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections import OrderedDict
from pathlib import Path

import torch

TILE = 256  # GEMM_BN: the tile of the listing epilogue's TwELL words
LIST_SLOTS = 16  # count + 15 entries per (token, tile) in the hybrid's words (C = 16)
BM, BK = 128, 64  # GEMM_BM, GEMM_BK
THREADS = 384
KERNEL = "gemm_bf16_tn_kernel"
SOURCE = "gemm_sm90.cu"

_BF16, _SWIZZLE_128B, _L2_256B = 9, 3, 3  # cuda.h CUtensorMap enums
_lock = threading.Lock()
_maps: OrderedDict = OrderedDict()
_MAX_MAPS = 256


def _define(defines: tuple[str, ...], name: str, default: int) -> int:
    for d in defines:
        if d.startswith(name + "="):
            return int(d.split("=", 1)[1])
    return default


def geometry(defines: tuple[str, ...] = ()) -> tuple[int, int]:
    """(blocks per cluster, dynamic shared memory bytes) of a build: the source's defaults (GEMM_CLUSTER 2,
    GEMM_STAGES 3) unless ``defines`` set them. Shared memory: the stages (x's 128 and w's 256 rows of 64 bf16), the
    epilogue's 64 KB tile, 1 KB of alignment slack, the stage barriers, the epilogue's barriers and tile info."""
    stages = _define(defines, "GEMM_STAGES", 3)
    return _define(defines, "GEMM_CLUSTER", 2), stages * (BM + TILE) * BK * 2 + (64 << 10) + 1024 + 2 * stages * 8 + 64


def usable(x: torch.Tensor, w: torch.Tensor, c_start: int = 0) -> bool:
    """Whether gate_list/matmul run for these operands: an sm_90 GPU, bf16 contiguous operands, K and N multiples
    of 8 (TMA's 16-byte rows), N <= 65536 (a word's column), c_start a multiple of 8, and the kernel built."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16 or w.dtype != torch.bfloat16:
        return False
    from sparsify_cli.kernels import loader

    if loader.capability(x.device.index if x.device.index is not None else torch.cuda.current_device()) != (9, 0):
        return False
    k, n = x.shape[1], w.shape[0]
    if not (x.is_contiguous() and w.is_contiguous() and w.shape[1] == k and k % 8 == 0 and n % 8 == 0
            and 0 < n <= 65536 and c_start % 8 == 0 and 0 <= c_start <= n):
        return False
    return _function_or_none(torch.cuda.current_device()) is not None


def n_tiles(n: int) -> int:
    return -(-n // TILE)


def gate_list(x: torch.Tensor, w: torch.Tensor, c_start: int, slots: int = LIST_SLOTS,
              defines: tuple[str, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """(act, words): module docstring. ``slots`` a multiple of 4 in [4, 256]; ``defines``: a build of the kernel
    (e.g. ("GEMM_LIST_FAST=1",), for the tools and tests that compare builds; () the default)."""
    if not (4 <= slots <= 256 and slots % 4 == 0):
        raise ValueError(f"slots must be a multiple of 4 in [4, 256], got {slots}")
    m, n = x.shape[0], w.shape[0]
    act = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    words = torch.empty(m, n_tiles(n), slots, dtype=torch.int32, device=x.device)
    _launch(x, w, act, words, c_start, slots, defines)
    return act, words


def matmul(x: torch.Tensor, w: torch.Tensor, defines: tuple[str, ...] = (),
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x·wᵀ (M, N) bf16, every element written (into ``out`` if given: contiguous (M, N) bf16)."""
    if out is None:
        out = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16, device=x.device)
    _launch(x, w, out, None, 0, 4, defines)
    return out


# ---- build ----------------------------------------------------------------------------------------------------

def compile_cubin(defines: tuple[str, ...] = ()) -> Path:
    """gemm_sm90.cu built for sm_90a by NVRTC: the cached cubin's file (loader.cubin_path)."""
    from sparsify_cli.kernels import loader

    return loader.cubin_path(SOURCE, "sm_90a", tuple(defines))


def _function(device_index: int, defines: tuple[str, ...] = ()):
    from sparsify_cli.kernels import loader

    return loader.get_cubin_function(SOURCE, KERNEL, "sm_90a", tuple(defines), device_index, geometry(defines)[1])


@functools.lru_cache(maxsize=None)
def _function_or_none(device_index: int):
    """_function, or None (with a warning, once) where the build fails: the caller keeps cuBLAS's gate GEMM."""
    try:
        return _function(device_index)
    except Exception as exc:  # a missing NVRTC, an older NVRTC without sm_90a: fall back, loudly
        import warnings

        warnings.warn(f"the Hopper gate GEMM is unavailable, using cuBLAS's: {exc}", RuntimeWarning, stacklevel=3)
        return None


# ---- launch ---------------------------------------------------------------------------------------------------

def _encode(t: torch.Tensor, box_rows: int, box_cols: int = 64):
    """A CUtensorMap over the 2-D bf16 tensor t: box_cols x box_rows boxes, 128-byte swizzle (cached by address,
    shape and box, LRU)."""
    key = (t.data_ptr(), tuple(t.shape), t.stride(0), box_rows, box_cols)
    with _lock:
        hit = _maps.get(key)
        if hit is not None:
            _maps.move_to_end(key)
            return hit
    from sparsify_cli.kernels import loader

    lib = loader._driver()
    fn = lib.cuTensorMapEncodeTiled
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
                   ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    desc = (ctypes.c_uint64 * 16)()
    rows, cols = t.shape
    rc = fn(desc, _BF16, 2, ctypes.c_void_p(t.data_ptr()), (ctypes.c_uint64 * 2)(cols, rows),
            (ctypes.c_uint64 * 1)(t.stride(0) * 2), (ctypes.c_uint32 * 2)(box_cols, box_rows),
            (ctypes.c_uint32 * 2)(1, 1), 0, _SWIZZLE_128B, _L2_256B, 0)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed (CUresult {rc}) for a {tuple(t.shape)} tensor")
    with _lock:
        _maps[key] = desc
        if len(_maps) > _MAX_MAPS:
            _maps.popitem(last=False)
    return desc


def _launch(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, words: torch.Tensor | None, c_start: int,
            slots: int, defines: tuple[str, ...] = ()) -> None:
    from sparsify_cli.kernels import loader

    m, k = x.shape
    n = w.shape[0]
    if not usable(x, w, c_start):
        raise ValueError(f"the Hopper GEMM cannot run for x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}, "
                         f"c_start {c_start} on this device (hopper.usable)")
    if m == 0:
        return
    defines = tuple(defines)
    cluster, smem = geometry(defines)
    fn = _function(torch.cuda.current_device(), defines)
    args = [_encode(x, BM), _encode(w, TILE // cluster), _encode(out, 64), ctypes.c_int32(m), ctypes.c_int32(n),
            ctypes.c_int32(k), ctypes.c_uint64(words.data_ptr() if words is not None else 0),
            ctypes.c_int32(c_start), ctypes.c_int32(slots)]
    work = -(-(-(-m // BM)) // cluster) * n_tiles(n)  # cluster-sized work items (the kernel's loop)
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    grid = min(work, sms // cluster) * cluster  # persistent: at most one block per SM
    loader.launch_ex(fn, (grid,), (THREADS,), args, smem, cluster=(cluster, 1, 1) if cluster > 1 else None)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
