"""Activation packing formats and their pure-torch reference semantics (docs/FORMAT.md is the spec).

twell.py       TwELL v1 (inference): tile-wise ELL words that the CUDA kernels produce and consume bit for bit
hybrid.py      hybrid ELL + dense tail (training) and its neuron-major CSC transpose (backward)
sparse_ffn.py  dense and sparse FFN forwards on CPU (gather-based; TwELL-consuming reference of the fused kernel)
Inputs with a chosen sparsity (PERFORMANCE.md's recipe) and the CPU benchmark live in sparsify_cli.bench
(synthetic.py, cpu.py; `sparsify bench --suite cpu`): formats/ does not import bench.
"""

from sparsify_cli.formats.hybrid import HybridELL, HybridT, pack_hybrid, transpose_hybrid, unpack_hybrid, unpack_hybrid_t
from sparsify_cli.formats.sparse_ffn import (
    dense_ffn_forward,
    dense_plain_ffn_forward,
    down_rows,
    sparse_ffn_forward,
    sparse_plain_ffn_forward,
    twell_ffn_forward,
    twell_plain_ffn_forward,
)
from sparsify_cli.formats.twell import (
    FORMAT_VERSION,
    TwELL,
    TwELLOverflowError,
    decode_entries,
    encode_entries,
    pack_twell,
    unpack_twell,
    validate_twell,
)

__all__ = [
    "FORMAT_VERSION", "TwELL", "TwELLOverflowError", "pack_twell", "unpack_twell", "encode_entries", "decode_entries",
    "validate_twell",
    "HybridELL", "HybridT", "pack_hybrid", "unpack_hybrid", "transpose_hybrid", "unpack_hybrid_t",
    "dense_ffn_forward", "dense_plain_ffn_forward", "down_rows", "sparse_ffn_forward", "sparse_plain_ffn_forward",
    "twell_ffn_forward", "twell_plain_ffn_forward",
]
