"""The gate GEMM through cuBLASLt with the RELU_AUX epilogue (ctypes; development tool for mask_tune.py).

One GEMM writes act = relu(x·wᵀ) (bf16, (M, H)) and act's relu bitmask (int32 (M, W), W = relu_mask_words(H):
bit c % 32 of word c // 32 of token m set where the relu passed), the form the prefill kernel's FFN_ACT_MASK
build lists entries from without scanning act. cuBLAS is column-major: act (M, H) row-major is C (H x M) with
ld H, w (H, D) row-major is A = (D x H) transposed, x (M, D) row-major is B = (D x M); the bitmask is C's shape
in bits with leading dimension 32·W (a multiple of 128, as cuBLASLt requires), so token m's bits start at word
m·W. Enum values and the heuristic result's layout are cublasLt.h's (stable ABI).
"""

from __future__ import annotations

import ctypes
import glob

import torch

from sparsify_cli.kernels.reference import relu_mask_words

CUDA_R_32F, CUDA_R_16BF, CUBLAS_COMPUTE_32F = 0, 14, 68
OP_N, OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB, DESC_EPILOGUE, DESC_EPILOGUE_AUX_POINTER, DESC_EPILOGUE_AUX_LD = 3, 4, 7, 11, 12
EPILOGUE_RELU_AUX = 130
PREF_MAX_WORKSPACE_BYTES = 1
WORKSPACE_BYTES = 32 << 20


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", ctypes.c_uint64 * 8), ("workspace_size", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves_count", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


def _library() -> ctypes.CDLL:
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # torch loads its cuBLASLt first
    names = ["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"]
    try:
        import nvidia

        names += [p for base in nvidia.__path__ for p in sorted(glob.glob(f"{base}/*/lib/libcublasLt.so*"))]
    except ImportError:
        pass
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RuntimeError("libcublasLt not found")


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed: cublasStatus {status}")


class LtReluGemm:
    """relu(x·wᵀ) and its bitmask for one shape (M, D) x (H, D): the descriptors and the heuristic's algorithm
    number ``algo`` (0: its first choice; ``algorithms`` says how many it offered) are made once; __call__ writes
    into given buffers on torch's current stream."""

    def __init__(self, m: int, d: int, h: int, device: torch.device | str = "cuda", algo: int = 0,
                 relu_aux: bool = True):
        """relu_aux=False: the plain GEMM x·wᵀ (default epilogue, no bitmask; mask arguments ignored)."""
        self.m, self.d, self.h, self.relu_aux = m, d, h, relu_aux
        self.words = relu_mask_words(h)
        lib = self.lib = _library()
        vp = ctypes.c_void_p
        self.handle = vp()
        _check(lib.cublasLtCreate(ctypes.byref(self.handle)), "cublasLtCreate")
        self.desc = vp()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F),
               "cublasLtMatmulDescCreate")
        self._set(DESC_TRANSA, ctypes.c_int32(OP_T))
        self._set(DESC_TRANSB, ctypes.c_int32(OP_N))
        if relu_aux:
            self._set(DESC_EPILOGUE, ctypes.c_uint32(EPILOGUE_RELU_AUX))
            self._set(DESC_EPILOGUE_AUX_LD, ctypes.c_int64(32 * self.words))
            self._set(DESC_EPILOGUE_AUX_POINTER, vp(256))  # the heuristic reads its alignment only; set per call
        self.a = self._layout(d, h, d)  # w: (D x H) column-major, transposed by the op
        self.b = self._layout(d, m, d)  # x: (D x M)
        self.c = self._layout(h, m, h)  # act: (H x M)
        pref = vp()
        _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "cublasLtMatmulPreferenceCreate")
        ws = ctypes.c_uint64(WORKSPACE_BYTES)
        _check(lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws),
                                                        ctypes.c_size_t(8)), "cublasLtMatmulPreferenceSetAttribute")
        results = (_HeuristicResult * 8)()
        count = ctypes.c_int(0)
        _check(lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.c, self.c, pref, 8,
                                                  results, ctypes.byref(count)), "cublasLtMatmulAlgoGetHeuristic")
        if count.value == 0:
            raise RuntimeError(f"cuBLASLt has no algorithm for M={m}, D={d}, H={h}")
        self.algorithms = count.value
        if not 0 <= algo < count.value:
            raise ValueError(f"algo {algo}: the heuristic offered {count.value} algorithms")
        self.result = results[algo]
        self.workspace = torch.empty(max(int(self.result.workspace_size), 1), dtype=torch.uint8, device=device)
        self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)

    def _set(self, attr: int, value) -> None:
        _check(self.lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(value),
                                                       ctypes.c_size_t(ctypes.sizeof(value))),
               f"cublasLtMatmulDescSetAttribute({attr})")

    def _layout(self, rows: int, cols: int, ld: int) -> ctypes.c_void_p:
        out = ctypes.c_void_p()
        _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(out), CUDA_R_16BF, ctypes.c_uint64(rows),
                                                   ctypes.c_uint64(cols), ctypes.c_int64(ld)),
               "cublasLtMatrixLayoutCreate")
        return out

    def buffers(self, device: torch.device | str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.empty(self.m, self.h, dtype=torch.bfloat16, device=device),
                torch.empty(self.m, self.words, dtype=torch.int32, device=device))

    def __call__(self, x: torch.Tensor, w: torch.Tensor, act: torch.Tensor, mask: torch.Tensor) -> None:
        assert x.shape == (self.m, self.d) and w.shape == (self.h, self.d) and x.is_contiguous() and w.is_contiguous()
        assert act.shape == (self.m, self.h)
        if self.relu_aux:
            assert mask.shape == (self.m, self.words) and mask.dtype == torch.int32
            self._set(DESC_EPILOGUE_AUX_POINTER, ctypes.c_void_p(mask.data_ptr()))
        vp = ctypes.c_void_p
        _check(self.lib.cublasLtMatmul(
            self.handle, self.desc, ctypes.byref(self.alpha), vp(w.data_ptr()), self.a, vp(x.data_ptr()), self.b,
            ctypes.byref(self.beta), vp(act.data_ptr()), self.c, vp(act.data_ptr()), self.c,
            ctypes.byref(self.result), vp(self.workspace.data_ptr()), ctypes.c_size_t(self.workspace.numel()),
            vp(torch.cuda.current_stream().cuda_stream)), "cublasLtMatmul")
