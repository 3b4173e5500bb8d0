"""Whether compressible device memory (the driver's "compute data compression") makes the hybrid's activation
round trip cheaper (development tool).

The gate GEMM writes the whole activation (M x width bf16: 516 MB at M = 65536 on a packed layer) and the list pass
reads it back: ~0.23 ms of the ~2.8 ms block at M = 65536, nnz 29, DRAM-bound. With relu applied in the GEMM's
epilogue (cuBLASLt's RELU_BIAS, a zero bias: torch._addmm_activation), ~99% of those values are zero, which the
GPU's generic compression may store in fewer DRAM (and L2) bytes, if the buffer is allocated compressible
(cuMemCreate with CU_MEM_ALLOCATION_COMP_GENERIC). Relu before the list pass changes no result: the pass applies
relu itself. Timed per shape, ROUNDS interleaved rounds, best round per cell:
  the gate GEMM as the block runs it, into a fixed buffer, with the relu epilogue into an ordinary and into a
  compressible buffer (and without relu into the compressible one); the list pass reading each relu'd buffer;
  the default block, and the same block with its activation from the relu epilogue in either buffer.

    python3 tests/gpu/compress_probe.py OUT.json     # COMPRESS_SHAPES=65536x29,16384x29; COMPRESS_LAYER=full
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from sparsify_cli.bench.ffn import cuda_time, dense_block
from sparsify_cli.kernels import ffn_forward, launchers, ops
from prefill_rows import packed_inputs, run_rows, shapes  # tests/gpu, beside this script

ROUNDS = int(os.environ.get("COMPRESS_ROUNDS", "4"))
ATTR_GENERIC_COMPRESSION_SUPPORTED = 107  # cuda.h, CUdevice_attribute
COMP_GENERIC = 1  # CUmemAllocationCompType


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocProp(ctypes.Structure):  # CUmemAllocationProp_v1
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", _Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_cu = ctypes.CDLL("libcuda.so.1")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed: CUresult {rc}")


def compression_supported(dev: int) -> bool:
    v = ctypes.c_int()
    _check(_cu.cuDeviceGetAttribute(ctypes.byref(v), ATTR_GENERIC_COMPRESSION_SUPPORTED, dev), "cuDeviceGetAttribute")
    return bool(v.value)


class _Raw:
    """A device pointer seen by torch through __cuda_array_interface__ (uint8, ``n`` bytes)."""

    def __init__(self, ptr: int, n: int):
        self.__cuda_array_interface__ = {"shape": (n,), "typestr": "|u1", "data": (ptr, False), "version": 3}


def compressible_empty(shape: tuple[int, ...], dtype: torch.dtype, dev: int, keep: list) -> tuple[torch.Tensor, bool]:
    """An uninitialised tensor in memory asked for as compressible; whether the driver granted compression.
    ``keep`` holds the mapping for the process's life (the probe never unmaps)."""
    prop = _AllocProp()
    prop.type, prop.location.type, prop.location.id = 1, 1, dev  # PINNED, DEVICE
    prop.allocFlags.compressionType = COMP_GENERIC
    gran = ctypes.c_size_t()
    _check(_cu.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), 0), "granularity")
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    size = (nbytes + gran.value - 1) // gran.value * gran.value
    handle = ctypes.c_ulonglong()
    _check(_cu.cuMemCreate(ctypes.byref(handle), ctypes.c_size_t(size), ctypes.byref(prop), ctypes.c_ulonglong(0)),
           "cuMemCreate")
    got = _AllocProp()
    _check(_cu.cuMemGetAllocationPropertiesFromHandle(ctypes.byref(got), handle), "properties")
    ptr = ctypes.c_ulonglong()
    _check(_cu.cuMemAddressReserve(ctypes.byref(ptr), ctypes.c_size_t(size), ctypes.c_size_t(0),
                                   ctypes.c_ulonglong(0), ctypes.c_ulonglong(0)), "cuMemAddressReserve")
    _check(_cu.cuMemMap(ptr, ctypes.c_size_t(size), ctypes.c_size_t(0), handle, ctypes.c_ulonglong(0)), "cuMemMap")
    acc = _AccessDesc()
    acc.location.type, acc.location.id, acc.flags = 1, dev, 3  # DEVICE, PROT_READWRITE
    _check(_cu.cuMemSetAccess(ptr, ctypes.c_size_t(size), ctypes.byref(acc), ctypes.c_size_t(1)), "cuMemSetAccess")
    keep.append((ptr, handle, size))
    t = torch.as_tensor(_Raw(ptr.value, nbytes), device=f"cuda:{dev}")
    return t.view(dtype).view(shape), got.allocFlags.compressionType == COMP_GENERIC


def block_from(x, pk, act_fn):
    """The default hybrid (hot first, listed) with its activation from ``act_fn()``."""
    act = act_fn()
    h_hot, lists = ops.relu_list(act, pk.n_hot, x @ pk.up[:pk.n_hot].T)
    out = torch.empty_like(x)
    launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot, init=h_hot @ pk.down_t[:pk.n_hot],
                              lists=lists)
    return out


def row(m: int, nnz: int) -> dict:
    dev = torch.cuda.current_device()
    inp, pk = packed_inputs(m, nnz, full=os.environ.get("COMPRESS_LAYER") == "full")
    x = inp.x
    keep: list = []
    plain = torch.empty(m, pk.width, dtype=x.dtype, device=x.device)
    comp, granted = compressible_empty((m, pk.width), x.dtype, dev, keep)
    zero_bias = torch.zeros(pk.width, dtype=x.dtype, device=x.device)
    gate_t = pk.gate.T

    def relu_gemm(buf):
        return lambda: torch._addmm_activation(zero_bias, x, gate_t, out=buf)

    u = x @ pk.up[:pk.n_hot].T
    h_hot = torch.empty_like(u)
    lists = torch.empty(m, launchers.LIST_SLOTS, dtype=torch.int32, device=x.device)
    default = lambda: ffn_forward(x, pk.gate, pk.up, pk.down_t, kernels="cuda", mode="sparse", n_hot=pk.n_hot)
    fns = {"dense": lambda: dense_block(x, inp.gate, inp.up, inp.down),
           "block, default": default,
           "block, relu epilogue, ordinary buffer": lambda: block_from(x, pk, relu_gemm(plain)),
           "block, relu epilogue, compressible buffer": lambda: block_from(x, pk, relu_gemm(comp)),
           "gate GEMM (allocating)": lambda: x @ gate_t,
           "gate GEMM into ordinary buffer": lambda: torch.mm(x, gate_t, out=plain),
           "gate GEMM into compressible buffer (no relu)": lambda: torch.mm(x, gate_t, out=comp),
           "gate GEMM, relu epilogue, ordinary buffer": relu_gemm(plain),
           "gate GEMM, relu epilogue, compressible buffer": relu_gemm(comp),
           "list pass reading ordinary (relu'd)": lambda: (relu_gemm(plain)(), launchers.launch_relu_list(
               plain, pk.n_hot, u, h_hot, lists))[1],
           "list pass reading compressible (relu'd)": lambda: (relu_gemm(comp)(), launchers.launch_relu_list(
               comp, pk.n_hot, u, h_hot, lists))[1]}
    # the list pass alone: time it after its buffer holds the relu'd activation (the two entries above include
    # the GEMM; these do not)
    relu_gemm(plain)()
    relu_gemm(comp)()
    torch.cuda.synchronize()
    alone = {"list pass alone, ordinary": lambda: launchers.launch_relu_list(plain, pk.n_hot, u, h_hot, lists),
             "list pass alone, compressible": lambda: launchers.launch_relu_list(comp, pk.n_hot, u, h_hot, lists)}
    rounds: dict[str, list[float]] = {k: [] for k in list(fns) + list(alone)}
    for _ in range(ROUNDS):
        for k, fn in fns.items():
            rounds[k].append(cuda_time(fn, 20))
        relu_gemm(plain)()
        relu_gemm(comp)()
        for k, fn in alone.items():
            rounds[k].append(cuda_time(fn, 20))
    ms = {k: min(v) for k, v in rounds.items()}
    ref = default()
    same = {k: bool(torch.equal(fns[k](), ref)) for k in ("block, relu epilogue, ordinary buffer",
                                                          "block, relu epilogue, compressible buffer")}
    relu_ref = torch.relu(x @ gate_t)
    return {"M": m, "nnz_target": nnz, "width": pk.width, "n_hot": pk.n_hot, "compression_granted": granted,
            "ms": ms, "speedup_vs_dense": {k: ms["dense"] / ms[k] for k in ms if k.startswith("block")},
            "same_bits_as_default": same,
            "relu_epilogue_equals_relu_of_gemm": {"ordinary": bool(torch.equal(relu_gemm(plain)(), relu_ref)),
                                                  "compressible": bool(torch.equal(relu_gemm(comp)(), relu_ref))},
            "activation_zero_fraction": float((relu_ref == 0).float().mean()), "ms_rounds": rounds}


def main() -> None:
    dev = torch.cuda.current_device()
    torch.empty(1, device="cuda")  # the primary context, current on this thread, for the driver calls
    supported = compression_supported(dev)
    print(f"generic compression supported: {supported}", flush=True)
    if not supported:
        sys.exit(0)
    pairs = shapes("COMPRESS_SHAPES", [(65536, 29), (16384, 29)])
    run_rows(sys.argv[1], "rows", pairs, row, rounds=ROUNDS, compression_supported=supported)


if __name__ == "__main__":
    main()
