"""Decode rows of bench/ffn.py over more batch sizes, and the decode density sweep at M = 64 (development tool).
For M <= 16 each row has the fused path (sparse_ms), the gate projection + decode kernel (sparse_unfused_ms) and
the fused path's kernel variants.

    python3 tests/gpu/decode_sweep.py OUT.json [M ...]
"""

from __future__ import annotations

import json
import sys

from sparsify_cli.bench import ffn


def main() -> None:
    out = sys.argv[1]
    ms = [int(v) for v in sys.argv[2:]] or [1, 2, 4, 8, 16, 32, 64]
    rows = []
    for m in ms:
        rows.append(ffn.decode_row(m, 30))
        r = rows[-1]
        print(f"M={m}: dense {r['dense_ms'] * 1e3:.1f} us, sparse {r['sparse_ms'] * 1e3:.1f} us "
              f"({r['speedup']:.2f}x, {r['sparse_path']}), unfused {r.get('sparse_unfused_ms', float('nan')) * 1e3:.1f} us, "
              f"variants {json.dumps({k: round(v * 1e3, 1) for k, v in r.get('fused_variants_ms', {}).items()})}, "
              f"err {r['rel_err_sparse']:.2e} vs bf16 {r['rel_err_torch_bf16']:.2e}; chained: dense "
              f"{r['dense_chain_ms'] * 1e3:.1f} us, sparse {r['sparse_chain_ms'] * 1e3:.1f} us "
              f"({r['speedup_chain']:.2f}x), without PDL {r.get('sparse_chain_no_pdl_ms', float('nan')) * 1e3:.1f} us, "
              f"decode from act {json.dumps({k: round(v * 1e3, 1) for k, v in r['decode_act_variants_ms'].items()})}",
              flush=True)
    sweep = []
    for nnz in (28, 56, 113, 169, 225):
        r = ffn.decode_row(64, 20, nnz=nnz)
        sweep.append({k: r[k] for k in ("M", "nnz_mean", "dense_ms", "sparse_ms", "speedup", "sparse_unfused_ms",
                                        "decode_act_variants_ms") if k in r})
        print(f"M=64 nnz {r['nnz_mean']:.1f}: dense/sparse {r['speedup']:.2f}x", flush=True)
    with open(out, "w") as f:
        json.dump({"rows": rows, "decode_density_sweep": sweep}, f, indent=1)


if __name__ == "__main__":
    main()
