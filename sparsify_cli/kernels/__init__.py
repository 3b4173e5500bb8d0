"""CUDA kernels (CuPy/NVRTC) for TwELL packing and sparse FFNs, their launchers, torch.library ops and
pure-torch references. Importing this package needs neither a GPU nor CuPy (both are loaded lazily).

Layers (flash-attention style): loader (the only RawModule site) -> launchers (checks, grids) -> ops
(torch.library custom ops ``sparsify::*`` with fake impls) -> ffn (public entry points, the dense/sparse
policy, the hybrid hot/cold path). reference.py holds the pure-torch semantics of every kernel. Results and
the reasons behind the defaults: BENCHMARKS.md.
"""

from sparsify_cli.kernels.availability import cuda_kernels_status, resolve_backend
from sparsify_cli.kernels.ffn import (
    DEFAULT_POLICY,
    SparsePolicy,
    dense_ffn,
    ffn_forward,
    hot_first_order,
    hybrid_ffn,
)

__all__ = [
    "cuda_kernels_status",
    "resolve_backend",
    "ffn_forward",
    "dense_ffn",
    "hybrid_ffn",
    "hot_first_order",
    "SparsePolicy",
    "DEFAULT_POLICY",
]
