"""torch.library ops (namespace "sparsify") over the CUDA launchers, with fake impls for torch.compile.

- sparsify::twell_pack(act, tile, slots) -> words        relu + TwELL pack (docs/FORMAT.md)
- sparsify::twell_ffn(x, words, up, down_t, act, tile) -> out
      gated (up given): out = (a ⊙ (x·Uᵀ))·DownT; plain (up None): out = a·DownT, a = the words' activation;
      overflowed tiles are read from relu(act) exactly. M <= 64 runs the decode kernel.
- sparsify::relu_ffn(x, act, up, down_t) -> out
      the same block straight from the dense activation (packing fused into the FFN kernel, no TwELL
      materialized): the fast path while the gate GEMM has no TwELL-writing epilogue. With c_start/init it
      is the sparse half of the hybrid path (ffn.hybrid_ffn): columns < c_start are done densely elsewhere;
      with lists (from relu_list) it reads each row's entries from them instead of scanning act.
- sparsify::relu_list(act, c_start, u) -> (h, lists)
      the hybrid's pass over the activation: h = relu(act[:, :c_start]) ⊙ u (u None: relu alone) and each row's
      relu-active columns >= c_start listed (count, then up to launchers.LIST_SLOTS - 1 words; kernels_cu/relu_list.cu).
- sparsify::relu_mul(act, n, u) -> relu(act[:, :n]) ⊙ u in one pass (the hybrid's hot neurons; act read in place).
- sparsify::gemv(x, w) -> x·wᵀ for 1..2 tokens (decode's gate projection; faster than cuBLAS's GEMV here).
- sparsify::decode_ffn(x, w_act, up, down_t) -> out
      the whole block for 1..16 tokens (decode): gate projection, relu and the active neurons' up dots in one
      pass over the gate weight, then the active rows of down_t (kernels_cu/decode_fused.cu).
Inference only: no autograd formula is registered (backward through these ops raises).

Each name here is a thin wrapper (_Op) over the registered op: called eagerly on plain tensors that need no
gradient, it runs the op's implementation directly; anywhere else (torch.compile, export, fake or other tensor
subclasses, a dispatch mode, inputs that require grad) it calls the op through the dispatcher. The dispatcher's
Python path for a custom op costs tens of µs of host time per call: the hybrid prefill block (two ops) took
0.237-0.247 ms of host time per call instead of 0.298-0.321 ms on one H200 machine, 0.27 instead of 0.52 ms on a
slower one (torch 2.11; tests/gpu/host_cost.py, BENCHMARKS.md session 17). That is what an eager caller whose
GPU work per layer is shorter than its host work (a small prefill) waits for; the GPU time is the same, and so
are the results.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sparsify_cli.kernels import launchers


def _plain_eager(args: tuple, kwargs: dict) -> bool:
    """True where the dispatcher would only run the op's implementation: not tracing or compiling, no dispatch
    mode, and every tensor argument a plain CUDA torch.Tensor that needs no gradient (the op has no autograd
    formula, so through the dispatcher a backward raises; called directly it would silently give no gradient;
    meta tensors go to the fake implementation)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or not a.is_cuda
                                            or (grad and a.requires_grad)):
            return False
    return True


class _Op:
    """A torch.library custom op (``op``, registered as sparsify::<name>) whose plain eager calls skip the
    dispatcher (module docstring)."""

    def __init__(self, name: str, impl: Callable):
        self.op = torch.library.custom_op(name, mutates_args=())(impl)
        self.impl = impl
        self.__doc__ = impl.__doc__

    def register_fake(self, fn: Callable) -> Callable:
        return self.op.register_fake(fn)

    def __call__(self, *args, **kwargs):
        if _plain_eager(args, kwargs):
            return self.impl(*args, **kwargs)
        return self.op(*args, **kwargs)


def _custom_op(name: str) -> Callable[[Callable], _Op]:
    return lambda impl: _Op(name, impl)


@_custom_op("sparsify::twell_pack")
def twell_pack(act: torch.Tensor, tile: int, slots: int) -> torch.Tensor:
    m, h = act.shape
    words = torch.empty(m, launchers.n_tiles(h, tile), slots, dtype=torch.int32, device=act.device)
    launchers.launch_twell_pack(act, words, tile, slots)
    return words


@twell_pack.register_fake
def _(act: torch.Tensor, tile: int, slots: int) -> torch.Tensor:
    launchers.check_tile(tile, slots)
    m, h = act.shape
    return act.new_empty((m, launchers.n_tiles(h, tile), slots), dtype=torch.int32)


@_custom_op("sparsify::twell_ffn")
def twell_ffn(x: torch.Tensor, words: torch.Tensor, up: Optional[torch.Tensor], down_t: torch.Tensor,
              act: torch.Tensor, tile: int) -> torch.Tensor:
    out = torch.empty_like(x)
    launchers.launch_twell_ffn(x, words, up, down_t, act, out, tile)
    return out


@twell_ffn.register_fake
def _(x, words, up, down_t, act, tile):
    return torch.empty_like(x)


@_custom_op("sparsify::relu_ffn")
def relu_ffn(x: torch.Tensor, act: torch.Tensor, up: Optional[torch.Tensor], down_t: torch.Tensor,
             c_start: int = 0, init: Optional[torch.Tensor] = None,
             lists: Optional[torch.Tensor] = None) -> torch.Tensor:
    out = torch.empty_like(x)
    launchers.launch_relu_ffn(x, act, up, down_t, out, c_start=c_start, init=init, lists=lists)
    return out


@relu_ffn.register_fake
def _(x, act, up, down_t, c_start=0, init=None, lists=None):
    return torch.empty_like(x)


@_custom_op("sparsify::relu_list")
def relu_list(act: torch.Tensor, c_start: int, u: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    h = act.new_empty((act.shape[0], c_start))
    lists = torch.empty(act.shape[0], launchers.LIST_SLOTS, dtype=torch.int32, device=act.device)
    launchers.launch_relu_list(act, c_start, u, h, lists)
    return h, lists


@relu_list.register_fake
def _(act, c_start, u):
    return act.new_empty((act.shape[0], c_start)), act.new_empty((act.shape[0], launchers.LIST_SLOTS),
                                                                 dtype=torch.int32)


@_custom_op("sparsify::relu_mul")
def relu_mul(act: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(u)
    launchers.launch_relu_mul(act[:, :n], u, h)
    return h


@relu_mul.register_fake
def _(act, n, u):
    return torch.empty_like(u)


@_custom_op("sparsify::gemv")
def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    launchers.launch_gemv(x, w, out)
    return out


@gemv.register_fake
def _(x, w):
    return x.new_empty((x.shape[0], w.shape[0]))


@_custom_op("sparsify::decode_ffn")
def decode_ffn(x: torch.Tensor, w_act: torch.Tensor, up: Optional[torch.Tensor], down_t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    launchers.launch_decode_ffn(x, w_act, up, down_t, out)
    return out


@decode_ffn.register_fake
def _(x, w_act, up, down_t):
    return torch.empty_like(x)
