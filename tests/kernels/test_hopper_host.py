"""The Hopper GEMM's host side without a GPU: the sm_90a build through NVRTC (the path kernels/hopper.py takes at
run time, cached on disk), the op's fake implementation, the routing rule and the TwELL-words checks."""

from __future__ import annotations

import pytest
import torch

from sparsify_cli.kernels import hopper, launchers, loader, ops
from sparsify_cli.kernels.ffn import SparsePolicy


def test_sm90a_build_through_nvrtc_is_cached(tmp_path, monkeypatch):
    if loader.nvrtc_library() is None:
        pytest.skip("libnvrtc not found (the dev extra's nvidia-cuda-nvrtc wheel provides it)")
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    path = hopper.compile_cubin()
    assert path.parent == tmp_path and path.stat().st_size > 10_000
    assert path.read_bytes()[:4] == b"\x7fELF"  # a cubin
    stamp = path.stat().st_mtime_ns
    assert hopper.compile_cubin() == path and path.stat().st_mtime_ns == stamp  # from the cache, not rebuilt
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_gate_list_fake_shapes():
    x = torch.empty(300, 512, dtype=torch.bfloat16, device="meta")
    w = torch.empty(1000, 512, dtype=torch.bfloat16, device="meta")
    act, words = ops.gate_list.op(x, w, 256, 16)
    assert act.shape == (300, 1000) and act.dtype == torch.bfloat16
    assert words.shape == (300, 4, 16) and words.dtype == torch.int32  # ceil(1000 / 256) tiles


def test_not_usable_off_hopper():
    x = torch.zeros(128, 64, dtype=torch.bfloat16)
    w = torch.zeros(256, 64, dtype=torch.bfloat16)
    assert not hopper.usable(x, w, 0)  # CPU tensors
    assert not SparsePolicy().gate_list_epilogue  # off by default: measured slower (BENCHMARKS.md session 18)


def test_relu_ffn_words_shape_checked():
    ok = torch.zeros(10, 4, 16, dtype=torch.int32)
    launchers._check_lists(ok, 10, ok.device, 1000, 256)
    with pytest.raises(ValueError):
        launchers._check_lists(torch.zeros(10, 3, 16, dtype=torch.int32), 10, ok.device, 1000, 256)  # 4 tiles
    with pytest.raises(ValueError):
        launchers._check_lists(torch.zeros(10, 4, 1, dtype=torch.int32), 10, ok.device, 1000, 256)  # no entry slot
    with pytest.raises(ValueError):
        hopper.gate_list(torch.zeros(8, 64, dtype=torch.bfloat16), torch.zeros(8, 64, dtype=torch.bfloat16), 0, 6)
