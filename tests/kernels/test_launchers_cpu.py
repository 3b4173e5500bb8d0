"""Launcher arithmetic that needs no GPU: the decode kernels' shared-memory sizing and its limits."""

from __future__ import annotations

from pathlib import Path

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
    with pytest.raises(ValueError, match=r"the fused decode path handles 1\.\.16 tokens, got M=17"):
        launchers.launch_decode_ffn(torch.zeros(17, 128, **bf), w, None, w, torch.zeros(17, 128, **bf))
    with pytest.raises(ValueError, match="D=96 must be a positive multiple of 64"):
        w96 = torch.zeros(64, 96, **bf)
        launchers.launch_decode_ffn(torch.zeros(1, 96, **bf), w96, None, w96, torch.zeros(1, 96, **bf))


def test_mma_tiles_cover_every_token_count_of_the_fused_kernels():
    """The tensor-core gate kernel's instance for m tokens has 8 * tiles >= m, and the smallest instance that does."""
    for m in range(1, launchers.FUSED_MAX_M + 1):
        nt = launchers.mma_tiles(m)
        assert nt in (1, 2) and 8 * nt >= m and (nt == 1 or 8 * (nt // 2) < m)


def _cuda_header() -> Path | None:
    import shutil

    nvcc = shutil.which("nvcc")
    roots = ([Path(nvcc).resolve().parent.parent] if nvcc else []) + [Path("/usr/local/cuda")]
    return next((r / "include" / "cuda.h" for r in roots if (r / "include" / "cuda.h").exists()), None)


def test_pdl_launch_structures_match_cuda_h(tmp_path):
    """The ctypes mirrors of CUlaunchConfig and CUlaunchAttribute that the PDL launch hands to cuLaunchKernelEx
    have cuda.h's sizes and offsets (compiled and printed by the C compiler), and the attribute id is cuda.h's."""
    import ctypes
    import shutil
    import subprocess

    from sparsify_cli.kernels import loader

    header, cc = _cuda_header(), shutil.which("cc") or shutil.which("gcc")
    if header is None or cc is None:
        pytest.skip("needs cuda.h and a C compiler")
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <cuda.h>\nint main(void) {\n"
        'printf("%zu %zu %zu %zu %zu %zu %zu %d\\n", sizeof(CUlaunchAttribute), offsetof(CUlaunchAttribute, value),'
        " sizeof(CUlaunchConfig), offsetof(CUlaunchConfig, sharedMemBytes), offsetof(CUlaunchConfig, hStream),"
        " offsetof(CUlaunchConfig, attrs), offsetof(CUlaunchConfig, numAttrs),"
        " (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);\nreturn 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run([cc, f"-I{header.parent}", str(src), "-o", str(exe)], check=True)
    got = [int(v) for v in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()]
    cfg = loader._LaunchConfig
    assert got == [ctypes.sizeof(loader._LaunchAttr), loader._LaunchAttr.value.offset, ctypes.sizeof(cfg),
                   cfg.shared_mem.offset, cfg.stream.offset, cfg.attrs.offset, cfg.num_attrs.offset,
                   loader._PROGRAMMATIC_STREAM_SERIALIZATION]


def test_pdl_launch_argument_types():
    """Kernel arguments reach cuLaunchKernelEx as CuPy would pass them: np.int32 as int, Python ints and np.int64
    as 64-bit (pointers); anything else is refused rather than guessed."""
    import ctypes

    import numpy as np

    from sparsify_cli.kernels import loader

    assert isinstance(loader._c_arg(np.int32(-3)), ctypes.c_int32) and loader._c_arg(np.int32(-3)).value == -3
    assert isinstance(loader._c_arg(2**40 + 16), ctypes.c_int64) and loader._c_arg(2**40 + 16).value == 2**40 + 16
    assert isinstance(loader._c_arg(np.int64(7)), ctypes.c_int64)
    with pytest.raises(TypeError, match="not supported by the PDL launch"):
        loader._c_arg(1.5)


def test_bench_times_only_gate_kernel_variants_that_exist():
    """decode_row's tuning variants for every M the fused path takes: the CUDA-core gate kernel only where it has
    an instance (M <= FUSED_GEMV_MAX_M, one lane per (token, row) pair), the tensor-core one always."""
    from sparsify_cli.bench.ffn import fused_gate_variants

    for m in range(1, launchers.FUSED_MAX_M + 1):
        combos = fused_gate_variants(m)
        assert ("mma", None, 3) in combos
        for impl, rows, _ in combos:
            if impl == "gemv":
                assert m <= launchers.FUSED_GEMV_MAX_M and m * rows <= 32
    assert all(impl == "mma" for impl, _, _ in fused_gate_variants(launchers.FUSED_MAX_M))


def test_relu_mul_refuses_bad_arguments_before_touching_a_gpu():
    import torch

    bf = dict(dtype=torch.bfloat16)
    act, u = torch.zeros(4, 64, **bf), torch.zeros(4, 16, **bf)
    with pytest.raises(ValueError, match="a must be 2-D"):
        launchers.launch_relu_mul(torch.zeros(64, **bf), u, torch.empty_like(u))
    with pytest.raises(ValueError, match="a must be torch.bfloat16"):
        launchers.launch_relu_mul(act.float()[:, :16], u, torch.empty_like(u))
    with pytest.raises(ValueError, match="unit column stride"):
        launchers.launch_relu_mul(act[:, ::4], u, torch.empty_like(u))
    with pytest.raises(ValueError, match="unit column stride"):  # one row: the column stride still counts
        launchers.launch_relu_mul(act[:1, ::4], u[:1], torch.empty_like(u[:1]))
    with pytest.raises(ValueError, match=r"u must have shape \(4, 16\)"):
        launchers.launch_relu_mul(act[:, :16], torch.zeros(4, 8, **bf), torch.empty_like(u))
    with pytest.raises(ValueError, match="h must be contiguous"):
        launchers.launch_relu_mul(act[:, :16], u, torch.zeros(16, 4, **bf).T)
    with pytest.raises(ValueError, match="a must be a CUDA tensor"):
        launchers.launch_relu_mul(act[:, :16], u, torch.empty_like(u))


def test_relu_list_and_lists_refuse_bad_arguments_before_touching_a_gpu():
    import torch

    bf = dict(dtype=torch.bfloat16)
    act, u, h = torch.zeros(4, 64, **bf), torch.zeros(4, 16, **bf), torch.zeros(4, 16, **bf)
    lists = torch.zeros(4, launchers.LIST_SLOTS, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of 8"):
        launchers.launch_relu_list(act, 12, u[:, :12], h[:, :12], lists)
    with pytest.raises(ValueError, match=r"u must have shape \(4, 16\)"):
        launchers.launch_relu_list(act, 16, u[:, :8].contiguous(), h, lists)
    with pytest.raises(ValueError, match="lists must be torch.int32"):
        launchers.launch_relu_list(act, 16, u, h, lists.long())
    with pytest.raises(ValueError, match="lists must be"):
        launchers.launch_relu_list(act, 16, u, h, torch.zeros(4, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="lists must be"):
        launchers.launch_relu_list(act, 16, u, h, torch.zeros(4, launchers.FFN_CAP + 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="exceeds"):
        launchers.launch_relu_list(torch.zeros(1, launchers.MAX_HIDDEN + 8, **bf), 0, None,
                                   torch.zeros(1, 0, **bf), lists[:1])
    with pytest.raises(ValueError, match="act must be a CUDA tensor"):
        launchers.launch_relu_list(act, 16, u, h, lists)


def test_launch_constants_match_the_kernel_sources():
    """The block sizes and list capacities the launchers compute grids and shared memory from are the kernels'
    own #defines (a mismatch would launch a wrong grid, not fail to compile)."""
    from sparsify_cli.kernels import loader

    def src(name):
        return (loader.kernel_dir() / name).read_text()

    expected = {
        "twell_ffn.cu": (("FFN_WARPS", launchers.FFN_WARPS), ("UP_WARPS", launchers.UP_WARPS),
                         ("FFN_CAP", launchers.FFN_CAP)),
        "relu_mul.cu": (("RELU_MUL_THREADS", launchers.RELU_MUL_THREADS),),
        "relu_list.cu": (("LIST_WARPS", launchers.LIST_WARPS),),
        "decode_down.cuh": (("DECODE_THREADS", launchers.DECODE_THREADS), ("DECODE_CAP", launchers.DECODE_CAP)),
        "decode_fused.cu": (("FUSED_GATE_WARPS", launchers.FUSED_GATE_WARPS), ("FUSED_SEG", launchers.FUSED_SEG),
                            ("DECODE_UP_WARPS", launchers.DECODE_UP_WARPS),
                            ("DECODE_UP_DOT_WARPS", launchers.decode_up_dot_warps(launchers.UP_ACT_ONE_PER_SM)),
                            ("DECODE_SEG_CAP", launchers.DECODE_SEG_CAP),
                            ("MMA_ROWS", launchers.FUSED_MMA_ROWS)),
    }
    for name, pairs in expected.items():
        text = src(name)
        for macro, value in pairs:
            assert f"#define {macro} {value}" in text, (name, macro, value)


def test_up_act_build_fits_one_wave_and_shared_memory():
    """decode_up_act_kernel: 16 warps while the grid fits one block per SM, 12 at two per SM beyond (a full-width
    layer at 64 tokens: 192 blocks on 132 SMs), x through L1 where x as fp32 would not fit in shared memory; the
    launch's block size follows the build."""
    assert launchers.up_act_build(128, 2048, True, 132) == launchers.UP_ACT_ONE_PER_SM
    assert launchers.up_act_build(192, 2048, True, 132) == launchers.UP_ACT_TWO_PER_SM
    assert launchers.up_act_build(64, 65536, True, 132) == launchers.UP_ACT_X_FROM_L1
    assert launchers.up_act_build(64, 65536, False, 132) == launchers.UP_ACT_ONE_PER_SM  # plain: no x
    assert 4 * 16384 <= launchers.UP_ACT_MAX_X_SMEM  # rows as wide as the largest Llama's keep the copy
    warps = [launchers.decode_up_dot_warps(b) for b in (launchers.UP_ACT_ONE_PER_SM, launchers.UP_ACT_TWO_PER_SM,
                                                         launchers.UP_ACT_X_FROM_L1)]
    assert warps == [16, 12, launchers.DECODE_UP_WARPS]


def test_launch_ex_builds_the_driver_call(monkeypatch):
    """loader.launch_ex (the PDL launches): the grid and block padded to 3-D, the shared memory, torch's current
    stream, the PDL attribute with its value, and each parameter's address; a driver error raises."""
    import ctypes
    from types import SimpleNamespace

    import torch

    from sparsify_cli.kernels import loader

    seen = {}

    class _Drv:
        rc = 0

        def cuLaunchKernelEx(self, cfg_ref, fn_ptr, params, extra):  # noqa: N802 (the driver's name)
            cfg = ctypes.cast(cfg_ref, ctypes.POINTER(loader._LaunchConfig)).contents
            attrs = [cfg.attrs[i] for i in range(cfg.num_attrs)]
            seen.update(grid=tuple(cfg.grid), block=tuple(cfg.block), smem=cfg.shared_mem, stream=cfg.stream,
                        fn=fn_ptr, attrs=[(a.id, ctypes.string_at(ctypes.addressof(a.value), 12)) for a in attrs],
                        p0=ctypes.c_int32.from_address(params[0]).value,
                        p1=ctypes.c_uint64.from_address(params[1]).value)
            return self.rc

    drv = _Drv()
    monkeypatch.setattr(loader, "_driver", lambda: drv)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: SimpleNamespace(cuda_stream=77))
    fn = SimpleNamespace(kernel=SimpleNamespace(ptr=1234))
    loader.launch_ex(fn, (66,), (384,), [ctypes.c_int32(-5), ctypes.c_uint64(2 ** 40)], 214_000, pdl=True)
    assert seen["grid"] == (66, 1, 1) and seen["block"] == (384, 1, 1) and seen["smem"] == 214_000
    assert seen["stream"] == 77 and seen["fn"] == 1234 and seen["p0"] == -5 and seen["p1"] == 2 ** 40
    assert seen["attrs"] == [(loader._PROGRAMMATIC_STREAM_SERIALIZATION, (1).to_bytes(4, "little") + bytes(8))]
    loader.launch_ex(fn, (1, 2), (32,), [ctypes.c_int32(0), ctypes.c_uint64(0)])
    assert seen["grid"] == (1, 2, 1) and seen["attrs"] == []
    drv.rc = 1
    with pytest.raises(RuntimeError, match="CUresult 1"):
        loader.launch_ex(fn, (1,), (32,), [ctypes.c_int32(0), ctypes.c_uint64(0)])
