"""Which way a sparsify op call goes (kernels/ops.py): plain eager calls on CUDA tensors run the implementation
directly; everything the dispatcher must see (fake tensors, dispatch modes, meta or CPU tensors, inputs that need
a gradient) goes through the registered op."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sparsify_cli.kernels import ops


class _CudaLike(torch.Tensor):
    pass


def _routes(monkeypatch, *args, **kwargs) -> str:
    """'impl' or 'op': the path ops.relu_ffn takes for these arguments (both ends replaced by recorders)."""
    seen = []
    monkeypatch.setattr(ops.relu_ffn, "impl", lambda *a, **k: seen.append("impl"))
    monkeypatch.setattr(ops.relu_ffn, "op", lambda *a, **k: seen.append("op"))
    ops.relu_ffn(*args, **kwargs)
    return seen[0]


def _plain_cuda(monkeypatch):
    """A plain tensor that reports itself as CUDA (no GPU here): is_cuda patched on the class for the test."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self.device.type in ("cuda", "cpu")))
    return torch.zeros(4, 8)


def test_plain_eager_cuda_call_skips_the_dispatcher(monkeypatch):
    t = _plain_cuda(monkeypatch)
    assert _routes(monkeypatch, t, t, None, t) == "impl"
    assert _routes(monkeypatch, t, t, None, t, c_start=0, init=t) == "impl"


def test_gradients_and_subclasses_and_modes_go_through_the_op(monkeypatch):
    t = _plain_cuda(monkeypatch)
    w = torch.zeros(4, 8, requires_grad=True)
    assert _routes(monkeypatch, t, t, w, t) == "op"  # a backward must raise, not vanish
    with torch.no_grad():
        assert _routes(monkeypatch, t, t, w, t) == "impl"
    assert _routes(monkeypatch, t, t, None, t.as_subclass(_CudaLike)) == "op"

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert _routes(monkeypatch, t, t, None, t) == "op"


def test_meta_and_cpu_tensors_go_through_the_op_and_its_fake(monkeypatch):
    cpu = torch.zeros(4, 8)
    assert _routes(monkeypatch, cpu, cpu, None, cpu) == "op"
    monkeypatch.undo()
    meta = torch.empty(4, 8, device="meta")
    out = ops.relu_ffn(meta, torch.empty(4, 16, device="meta"), None, torch.empty(16, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 8)


def test_the_ops_stay_registered():
    for name in ("twell_pack", "twell_ffn", "relu_ffn", "relu_list", "relu_mul", "gemv", "decode_ffn"):
        assert hasattr(torch.ops.sparsify, name)
        assert getattr(ops, name).op is not None
