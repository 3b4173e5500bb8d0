"""Every kernels_cu/*.cu compiles for Hopper (sm_90a) and a portable arch (sm_80); no register spills on
Hopper, the tuned target (register budgets are cut for H100 occupancy; sm_80 may spill a few bytes).

Uses nvcc when present (no GPU needed), and NVRTC from the dev extra's wheel on the source as the loader expands
it; each is skipped with the reason where it is missing.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sparsify_cli.kernels.loader import read_source
from sparsify_cli.resources import resource_dir

NVCC = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if shutil.which("/usr/local/bin/nvcc") else None)
SOURCES = sorted(p.name for p in resource_dir("kernels_cu").glob("*.cu"))


def test_sources_exist():
    assert {"twell_pack.cu", "twell_ffn.cu", "twell_decode.cu", "gemv.cu"} <= set(SOURCES)


def _nvcc_spills(src: str, arch: str, tmp_path, defines: tuple[str, ...] = ()) -> list[int]:
    """Compile kernels_cu/<src> with nvcc (warnings are errors) and return ptxas's spill-store bytes per kernel."""
    path = resource_dir("kernels_cu") / src
    cmd = [NVCC, "-std=c++17", f"-gencode=arch={arch}", *(f"-D{d}" for d in defines), "-c", str(path),
           "-o", str(tmp_path / "k.o"), "-Xptxas", "-v", "-Werror", "all-warnings"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", res.stderr)]
    assert spills, res.stderr
    return spills


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit to compile-test kernels)")
@pytest.mark.parametrize("arch", ["compute_90a,code=sm_90a", "compute_80,code=sm_80"])
@pytest.mark.parametrize("src", SOURCES)
def test_compiles(src, arch, tmp_path):
    spills = _nvcc_spills(src, arch, tmp_path)
    if "sm_90a" in arch:
        assert max(spills) == 0, spills


# Builds that tools select with defines (launchers' `defines=`, tests/gpu/prefill_tune.py's builds): each must
# compile without spills on Hopper too.
VARIANTS = [("twell_ffn.cu", ("FFN_ACT_PREFETCH=0",)), ("twell_ffn.cu", ("FFN_STREAM_HINTS=0",)),
            ("relu_list.cu", ("LIST_STEP=8",)), ("relu_list.cu", ("LIST_GLUE=8",)),
            ("relu_list.cu", ("LIST_PREFETCH=1",)),
            ("twell_ffn.cu", ("FFN_X_SMEM=0", "FFN_ACT_X_SMEM=0")),
            ("twell_ffn.cu", ("FFN_UP_PAIRS=0",)), ("decode_fused.cu", ("DECODE_UP_XF=0",)),
            ("decode_fused.cu", ("DECODE_UP_DOT_WARPS=12", "DECODE_UP_MIN_BLOCKS=2"))]


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit to compile-test kernels)")
@pytest.mark.parametrize("src,defines", VARIANTS)
def test_build_variants_compile(src, defines, tmp_path):
    assert max(_nvcc_spills(src, "compute_90a,code=sm_90a", tmp_path, defines)) == 0


def _nvrtc() -> ctypes.CDLL | None:
    """libnvrtc: the dev extra's nvidia-cuda-nvrtc wheel, else a CUDA toolkit's, else the system's; None if none."""
    names = []
    try:
        import nvidia

        names += [p for base in nvidia.__path__ for p in sorted(glob.glob(f"{base}/*/lib/libnvrtc.so*"))]
    except ImportError:
        pass
    for root in filter(None, (os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda")):
        names += sorted(glob.glob(f"{root}/lib64/libnvrtc.so*"))
    for name in names + ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]:
        if "builtins" in name or "alt" in os.path.basename(name):
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


NVRTC = _nvrtc()


def nvrtc_compile(name: str, arch: str, defines: tuple[str, ...] = (), source: str | None = None,
                  name_expressions: tuple[str, ...] = ()) -> None:
    """kernels_cu/<name> as the loader hands it to NVRTC (local headers expanded, -std=c++17) compiled for arch, or
    ``source`` under that name, with CuPy's name expressions (template instances) if given; fails with NVRTC's log."""
    opts = [b"-std=c++17", f"--gpu-architecture={arch}".encode(), *(f"-D{d}".encode() for d in defines)]
    prog = ctypes.c_void_p()
    text = read_source(name) if source is None else source
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), name.encode(), 0, None, None) == 0
    try:
        for expr in name_expressions:
            assert NVRTC.nvrtcAddNameExpression(prog, expr.encode()) == 0, expr
        rc = NVRTC.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetProgramLog(prog, log)
        assert rc == 0, f"NVRTC could not compile {name} for {arch}: {log.value.decode(errors='replace')}"
    finally:
        NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (the dev extra's nvidia-cuda-nvrtc wheel provides it)")
@pytest.mark.parametrize("src", SOURCES)
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_compiles_with_nvrtc_as_loaded(src, arch):
    """The source exactly as kernels/loader.py hands it to NVRTC at run time (local headers expanded, -std=c++17,
    the device's arch) compiles: NVRTC has no host headers, so this catches what nvcc alone would let through."""
    nvrtc_compile(src, arch)


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (the dev extra's nvidia-cuda-nvrtc wheel provides it)")
@pytest.mark.parametrize("src,defines", VARIANTS)
def test_build_variants_compile_with_nvrtc(src, defines):
    nvrtc_compile(src, "sm_90", defines)


# Development tools' probes under tests/gpu: the tool compiles each with common.cuh in front; so does this test
PROBE_DIR = Path(__file__).resolve().parents[1] / "gpu"
PROBES = sorted(p.name for p in PROBE_DIR.glob("*.cu"))


def test_probes_exist():
    assert "read_floor.cu" in PROBES


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (install the CUDA toolkit to compile-test kernels)")
@pytest.mark.parametrize("probe", PROBES)
def test_probe_compiles(probe, tmp_path):
    src = tmp_path / probe
    src.write_text(f'#include "{resource_dir("kernels_cu") / "common.cuh"}"\n' + (PROBE_DIR / probe).read_text())
    cmd = [NVCC, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-c", str(src), "-o", str(tmp_path / "p.o"),
           "-Werror", "all-warnings"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc not found (the dev extra's nvidia-cuda-nvrtc wheel provides it)")
def test_read_floor_probe_compiles_with_nvrtc_as_loaded():
    """tests/gpu/read_floor.py's module exactly as it builds it: common.cuh's text, the probe, its three instances."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("read_floor", PROBE_DIR / "read_floor.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # imports torch and the package only; the GPU is touched in main()
    nvrtc_compile("read_floor.cu", "sm_90", source=tool.probe_source(),
                  name_expressions=tuple(tool.instance(u) for u in tool.UNROLLS))
