"""Launcher arithmetic that needs no GPU: the decode kernels' shared-memory sizing and its limits."""

from __future__ import annotations

import pytest

from sparsify_cli.kernels import launchers


class _Fn:
    max_dynamic_shared_size_bytes = 0


def test_decode_smem_counts_offsets_batch_row_and_partials():
    chunks, cvr = launchers.decode_chunks(2048, 1)
    assert (chunks, cvr) == (8, 32)  # one token: D split over 8 blocks of 32 column vectors
    n_tiles = launchers.n_tiles(5632, 256)
    want = (n_tiles + 1) * 4 + 2 * launchers.DECODE_CAP * 4 + cvr * 8 * 4 + launchers.DECODE_THREADS * 8 * 4
    assert launchers.decode_smem(n_tiles, cvr) == want


def test_allow_smem_raises_the_limit_only_above_48k_and_refuses_above_227k():
    fn = _Fn()
    launchers._allow_smem(fn, 40 * 1024, "decode path", 2048, 5632)
    assert fn.max_dynamic_shared_size_bytes == 0
    launchers._allow_smem(fn, 60 * 1024, "decode path", 2048, 5632)
    assert fn.max_dynamic_shared_size_bytes == 60 * 1024
    with pytest.raises(ValueError, match=r"fused decode: D=65536, H=5632 need \d+ bytes .*> 227 KB"):
        launchers._allow_smem(fn, 300 * 1024, "fused decode", 65536, 5632)


def test_check_aligned_names_the_misaligned_tensor_and_skips_absent_ones():
    import torch

    buf = torch.zeros(64, dtype=torch.bfloat16)
    launchers._check_aligned(x=buf, up=None)
    with pytest.raises(ValueError, match="down_t must be 16-byte aligned"):
        launchers._check_aligned(x=buf, down_t=buf[1:])


def test_small_m_launchers_refuse_bad_shapes_before_touching_a_gpu():
    import torch

    bf = dict(dtype=torch.bfloat16)
    w = torch.zeros(64, 128, **bf)
    with pytest.raises(ValueError, match=r"gemv handles 1\.\.2 tokens, got M=3"):
        launchers.launch_gemv(torch.zeros(3, 128, **bf), w, torch.zeros(3, 64, **bf))
    with pytest.raises(ValueError, match="D=100 must be a positive multiple of 8"):
        launchers.launch_gemv(torch.zeros(1, 100, **bf), torch.zeros(64, 100, **bf), torch.zeros(1, 64, **bf))
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        launchers.launch_gemv(torch.zeros(1, 128, **bf), w, torch.zeros(1, 64, **bf))
    with pytest.raises(ValueError, match="x and w_act must be 2-D"):
        launchers.launch_decode_ffn(torch.zeros(128, **bf), w, None, w, torch.zeros(1, 128, **bf))
    with pytest.raises(ValueError, match=r"the fused decode path handles 1\.\.8 tokens, got M=9"):
        launchers.launch_decode_ffn(torch.zeros(9, 128, **bf), w, None, w, torch.zeros(9, 128, **bf))
    with pytest.raises(ValueError, match="D=96 must be a positive multiple of 64"):
        w96 = torch.zeros(64, 96, **bf)
        launchers.launch_decode_ffn(torch.zeros(1, 96, **bf), w96, None, w96, torch.zeros(1, 96, **bf))
