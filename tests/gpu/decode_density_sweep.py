"""The decode density sweep for the fused path (M <= 16) beside the unfused one (M = 64): dense vs sparse as the
active neurons per token grow, under CUDA graphs (bench/ffn.py's decode rows). Development tool: calibrates
SparsePolicy's decode limits. (The sweep with M = 16 and 32 in bench_results/session5/density_tiles.json was taken
while the fused kernels handled up to 32 tokens: "fused kernels" is that path.)

    python3 tests/gpu/decode_density_sweep.py OUT.json [M ...]
"""

from __future__ import annotations

import json
import sys

from sparsify_cli.bench import ffn

NNZ = (28, 56, 113, 170, 227, 340)


def main() -> None:
    out = sys.argv[1]
    ms = [int(v) for v in sys.argv[2:]] or [1, 8, 64]
    rows = []
    for m in ms:
        for nnz in NNZ:
            r = ffn.decode_row(m, 20, nnz=nnz)
            rows.append({k: r[k] for k in ("M", "nnz_mean", "dense_ms", "sparse_ms", "speedup", "sparse_path",
                                           "sparse_unfused_ms") if k in r})
            print(f"M={m} nnz {r['nnz_mean']:.1f} ({r['nnz_mean'] / ffn.HIDDEN:.2%}): dense {r['dense_ms'] * 1e3:.1f} us, "
                  f"sparse {r['sparse_ms'] * 1e3:.1f} us, {r['speedup']:.2f}x ({r['sparse_path']})", flush=True)
    json.dump({"rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
