"""The Hopper GEMM (kernels_cu/gemm_sm90.cu) from Python: built for sm_90a, fed TMA maps, launched in clusters.

    gate_list(x, w, c_start, slots) -> (act, words)
        act = x·wᵀ (M, N) bf16 and words = the TwELL words (docs/FORMAT.md, tile 256) of relu(act) with the
        columns < c_start left out, from the GEMM's epilogue: the hybrid prefill's gate projection and cold listing
        in one kernel (ffn.gate_listed_hybrid; off by default, SparsePolicy.gate_list_epilogue: measured slower so
        far, BENCHMARKS.md session 18). act is written only where a consumer reads it: the tiles holding
        columns < c_start (the hot glue) and, per 64 rows, the tiles where a row overflowed its K = slots - 1
        entries (the sparse kernel scans act there); elsewhere it is left unwritten.
    matmul(x, w) -> x·wᵀ, every tile written (the same bits as cuBLAS's, BENCHMARKS.md session 18).

Why not through loader.py: CuPy's NVRTC path appends -arch=sm_XY for the device, and wgmma, TMA and setmaxnreg
exist only for sm_90a. So this module compiles the source with NVRTC itself (ctypes; the library CuPy uses),
keeps the cubin in a file cache, loads it with CuPy and launches through the driver's cuLaunchKernelEx (TMA maps
are 128-byte kernel parameters, and the cluster shape is a launch attribute), on torch's current stream.
Only compute capability 9.0 takes this path (`usable`); everything else keeps the cuBLAS gate GEMM.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

TILE = 256  # GEMM_BN: the tile of the listing epilogue's TwELL words
LIST_SLOTS = 16  # count + 15 entries per (token, tile) in the hybrid's words (C = 16)
BM = 128
CLUSTER = 2  # GEMM_CLUSTER (the source's default)
STAGES = 3  # GEMM_STAGES (the source's default)
THREADS = 384
SMEM_BYTES = STAGES * (BM + TILE) * 64 * 2 + (64 << 10) + 1024 + 2 * STAGES * 8 + 64  # + epilogue barriers, info
KERNEL = "gemm_bf16_tn_kernel"

_BF16, _SWIZZLE_128B, _L2_256B = 9, 3, 3  # cuda.h CUtensorMap enums
_CLUSTER_DIMENSION = 4  # CUlaunchAttributeID
_lock = threading.Lock()
_maps: OrderedDict = OrderedDict()
_MAX_MAPS = 256


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


def matmul(x: torch.Tensor, w: torch.Tensor, defines: tuple[str, ...] = ()) -> torch.Tensor:
    """x·wᵀ (M, N) bf16, every element written."""
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.bfloat16, device=x.device)
    _launch(x, w, out, None, 0, 4, defines)
    return out


# ---- build ----------------------------------------------------------------------------------------------------

def _nvrtc() -> ctypes.CDLL | None:
    """libnvrtc: the one the process already loaded (CuPy's), else the usual names and the CUDA wheels' copies."""
    try:
        with open("/proc/self/maps") as f:
            loaded = sorted({line.split()[-1] for line in f if "libnvrtc.so" in line and "builtins" not in line})
    except OSError:
        loaded = []
    names = loaded + ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    for root in filter(None, (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        names += sorted(glob.glob(f"{root}/lib64/libnvrtc.so*"))
    try:
        import nvidia

        names += [p for base in nvidia.__path__ for p in sorted(glob.glob(f"{base}/*/lib/libnvrtc.so*"))]
    except ImportError:
        pass
    for name in names:
        if "builtins" in name or "alt" in Path(name).name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _cache_dir() -> Path:
    root = os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache")
    return Path(root)


def compile_cubin(defines: tuple[str, ...] = ()) -> Path:
    """gemm_sm90.cu compiled for sm_90a by NVRTC: the cubin's file (a cache keyed by source, options and NVRTC
    version; written atomically)."""
    from sparsify_cli.kernels.loader import read_source

    lib = _nvrtc()
    if lib is None:
        raise RuntimeError("libnvrtc not found (the Hopper GEMM is compiled for sm_90a with NVRTC)")
    src = read_source("gemm_sm90.cu")
    opts = [b"-std=c++17", b"--gpu-architecture=sm_90a", *(f"-D{d}".encode() for d in defines)]
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    key = hashlib.sha256(src.encode() + b"\0".join(opts) + f"{major.value}.{minor.value}".encode()).hexdigest()[:32]
    path = _cache_dir() / f"sparsify_gemm_sm90a_{key}.cubin"
    if path.is_file():
        return path
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"gemm_sm90.cu", 0, None, None) != 0:
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if rc != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile gemm_sm90.cu for sm_90a: {log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        data = cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return path


@functools.lru_cache(maxsize=None)
def _function(device_index: int, defines: tuple[str, ...] = ()):
    """The kernel (a build) on this device (CuPy loads the module into the device's context), its shared memory
    allowed."""
    import cupy

    path = compile_cubin(tuple(defines))
    with cupy.cuda.Device(device_index):
        module = cupy.RawModule(path=str(path))
        fn = module.get_function(KERNEL)
        fn.max_dynamic_shared_size_bytes = SMEM_BYTES
    return module, fn


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
    _, fn = _function(torch.cuda.current_device(), tuple(defines))
    args = [_encode(x, BM), _encode(w, TILE // CLUSTER), _encode(out, 64), ctypes.c_uint64(out.data_ptr()),
            ctypes.c_int32(m), ctypes.c_int32(n), ctypes.c_int32(k),
            ctypes.c_uint64(words.data_ptr() if words is not None else 0), ctypes.c_int32(c_start),
            ctypes.c_int32(slots)]
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    work = -(-(-(-m // BM)) // CLUSTER) * n_tiles(n)  # cluster-sized work items (the kernel's loop)
    sms = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    grid = min(work, sms // CLUSTER) * CLUSTER  # persistent: at most one block per SM
    attr = loader._LaunchAttr(id=_CLUSTER_DIMENSION)
    dims = (ctypes.c_uint * 3)(CLUSTER, 1, 1)
    ctypes.memmove(ctypes.addressof(attr.value), dims, ctypes.sizeof(dims))
    cfg = loader._LaunchConfig((ctypes.c_uint * 3)(grid, 1, 1), (ctypes.c_uint * 3)(THREADS, 1, 1), SMEM_BYTES,
                               torch.cuda.current_stream().cuda_stream, ctypes.pointer(attr), 1)
    rc = loader._driver().cuLaunchKernelEx(ctypes.byref(cfg), fn.kernel.ptr, params, None)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernelEx (Hopper GEMM) failed with CUresult {rc}")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
