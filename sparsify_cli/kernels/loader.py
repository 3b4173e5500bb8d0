"""The only cupy.RawModule site: compile kernels_cu/*.cu with NVRTC (-std=c++17, CuPy adds -arch=sm_XY of
the device), cache, launch on torch's current stream. Launches that need the driver's cuLaunchKernelEx
(programmatic dependent launch) go through launch_ex.

CuPy is imported lazily (CPU machines do not have it). Modules are cached in-process by (file, arch,
template instances) and on disk by CuPy's own kernel cache. Launches pass raw ``tensor.data_ptr()`` integers
and a cached CuPy wrapper of torch's current stream as ``stream=``: ~13 µs host cost per
launch instead of ~55 µs with dlpack conversion and stream contexts (PERFORMANCE.md).
"""

from __future__ import annotations

import ctypes
import functools
import re
import threading
from pathlib import Path

from sparsify_cli.resources import resource_dir

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)
_lock = threading.Lock()
_modules: dict[tuple, object] = {}
_streams: dict[tuple[int, int], object] = {}


def kernel_dir() -> Path:
    return resource_dir("kernels_cu")


def read_source(name: str) -> str:
    """The .cu source with local ``#include "x.cuh"`` lines expanded (so CuPy's cache key sees the headers).

    Each header is expanded once, at its first include (the headers' ``#pragma once`` means nothing to text
    that is already inlined, so a header included by two others would otherwise be defined twice)."""
    root = kernel_dir()
    seen: set[str] = set()

    def expand(text: str) -> str:
        def repl(mt: re.Match) -> str:
            inc = mt.group(1)
            if inc in seen:
                return ""
            seen.add(inc)
            return expand((root / inc).read_text())

        return _INCLUDE_RE.sub(repl, text)

    return expand((root / name).read_text())


def device_arch(device_index: int | None = None) -> str:
    """The device's target, sm_XY. (Part of the in-process cache key.)

    CuPy appends ``-arch=sm_XY`` for the current device to the NVRTC options itself (cupy.cuda.compiler), so
    no architecture option is passed here: a second one would conflict. None of the current kernels uses
    Hopper-only (sm_90a) instructions; one that does must be compiled through a path that sets sm_90a alone.
    """
    import torch

    return _arch(torch.cuda.current_device() if device_index is None else device_index)


@functools.lru_cache(maxsize=None)
def capability(device_index: int) -> tuple[int, int]:
    """The device's compute capability, read once per device (per-call reads cost 20-40 µs of host time)."""
    import torch

    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """The device's number of SMs, read once per device (a launcher sizing its grid to one wave reads it per call)."""
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _arch(device_index: int) -> str:
    major, minor = capability(device_index)
    return f"sm_{major}{minor}"


def get_module(name: str, name_expressions: tuple[str, ...], arch: str | None = None,
               defines: tuple[str, ...] = (), device_index: int | None = None):
    """Compile (once per process and device; CuPy caches on disk) ``kernels_cu/<name>`` with the given template
    instances. A CuPy module is loaded on the device current at its first use, hence the device in the key."""
    import cupy
    import torch

    if device_index is None:
        device_index = torch.cuda.current_device()
    if arch is None:
        arch = _arch(device_index)
    key = (name, arch, name_expressions, defines, device_index)
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                mod = cupy.RawModule(
                    code=read_source(name),
                    options=("-std=c++17",) + tuple(f"-D{d}" for d in defines),
                    name_expressions=name_expressions,
                )
                mod.compile()
                _modules[key] = mod
    return mod


@functools.lru_cache(maxsize=None)
def _function(name: str, expr: str, device_index: int, defines: tuple[str, ...]):
    return get_module(name, (expr,), _arch(device_index), defines, device_index).get_function(expr)


def get_function(name: str, expr: str, defines: tuple[str, ...] = ()):
    """The kernel ``expr`` (e.g. ``twell_pack_kernel<8>``) from ``kernels_cu/<name>``, optionally compiled
    with preprocessor ``defines`` such as ``("FFN_MIN_BLOCKS=4",)`` (tuning variants), for the current device.
    Hot path (every launch): one cached lookup; the device's capability is read once per device (reading it
    per call cost ~20-40 µs of host time per launch, measured by tests/gpu/profile_train_host.py)."""
    import torch

    return _function(name, expr, torch.cuda.current_device(), tuple(defines))


def current_stream():
    """A cached CuPy stream object wrapping torch's current CUDA stream (no copy, no synchronization).

    CuPy 14 wraps foreign streams through the CUDA stream protocol (``Stream.from_external`` on an object with
    ``__cuda_stream__``, which torch's streams have); older CuPy only has ``ExternalStream``, deprecated in 14.
    """
    import torch

    index = torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # the stream's handle without a Python object
    key = (index, raw(index)) if raw is not None else None
    ext = _streams.get(key) if key is not None else None
    if ext is None:
        import cupy

        s = torch.cuda.current_stream()
        key = (s.device.index if s.device.index is not None else 0, s.cuda_stream)
        ext = _streams.get(key)
    if ext is None:
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None and hasattr(s, "__cuda_stream__"):
            ext = from_external(s)
        else:
            ext = cupy.cuda.ExternalStream(s.cuda_stream, key[0])
        _streams[key] = ext
    return ext


def launch(fn, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, shared_mem: int = 0,
           pdl: bool = False) -> None:
    """Launch on torch's current stream. ``args`` holds ints (pointers via data_ptr()) already typed by caller.
    pdl: with programmatic dependent launch (sm_90+; the kernel must call pdl_wait() of common.cuh before it
    reads another kernel's output or writes anything), through the driver's cuLaunchKernelEx, which CuPy does
    not expose."""
    if pdl:
        _launch_pdl(fn, grid, block, args, shared_mem)
    else:
        fn(grid, block, args, shared_mem=shared_mem, stream=current_stream())


# cuLaunchKernelEx's structures (cuda.h): CUlaunchAttribute is {id, 4 bytes of padding, a 64-byte union}.
_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


class _AttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("as_int", ctypes.c_int), ("_align", ctypes.c_uint64)]


class _LaunchAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint)]


@functools.lru_cache(maxsize=None)
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    return lib


def _c_arg(v):
    """One kernel argument as the C value CuPy would pass: a Python int is a 64-bit integer or pointer."""
    import numpy as np

    if isinstance(v, np.int32):
        return ctypes.c_int32(int(v))
    if isinstance(v, (np.int64, int)) and not isinstance(v, bool):
        return ctypes.c_int64(int(v))
    if isinstance(v, np.float32):
        return ctypes.c_float(float(v))
    raise TypeError(f"kernel argument of type {type(v).__name__} is not supported by the PDL launch")


def _launch_pdl(fn, grid, block, args, shared_mem: int) -> None:
    launch_ex(fn, grid, block, [_c_arg(a) for a in args], shared_mem, pdl=True)


def launch_ex(fn, grid: tuple[int, ...], block: tuple[int, ...], c_args: list, shared_mem: int = 0, *,
              pdl: bool = False) -> None:
    """Launch through the driver's cuLaunchKernelEx on torch's current stream. ``c_args``: ctypes objects, one
    per kernel parameter (typed ints), kept alive until the call returns (the driver copies them).
    pdl: programmatic dependent launch."""
    import torch

    attrs = []
    if pdl:
        a = _LaunchAttr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
        a.value.as_int = 1
        attrs.append(a)
    arr = (_LaunchAttr * len(attrs))(*attrs) if attrs else None
    grid = tuple(grid) + (1,) * (3 - len(grid))
    block = tuple(block) + (1,) * (3 - len(block))
    cfg = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                        torch.cuda.current_stream().cuda_stream,
                        ctypes.cast(arr, ctypes.POINTER(_LaunchAttr)) if arr is not None else None, len(attrs))
    params = (ctypes.c_void_p * len(c_args))(*[ctypes.addressof(v) for v in c_args])
    rc = _driver().cuLaunchKernelEx(ctypes.byref(cfg), fn.kernel.ptr, params, None)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc} (pdl={pdl})")
