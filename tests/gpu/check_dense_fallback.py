"""Dense tail layouts: dense block (Down, NT) vs ffn_forward's dense fallback with DownT (NN) and with Down."""

from sparsify_cli.bench.ffn import cuda_time, dense_block
from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels.ffn import ffn_forward

for m, nnz in ((16384, 56), (16384, 112), (65536, 112)):
    inp = make_ffn_inputs(m, 2048, 5632, nnz, device="cuda", seed=3)
    x, g, u, d = inp.x, inp.gate, inp.up, inp.down
    dt = d.T.contiguous()
    t = {
        "dense_block": cuda_time(lambda: dense_block(x, g, u, d)),
        "auto_hint_downT": cuda_time(lambda: ffn_forward(x, g, u, dt, mode="auto", kernels="cuda", nnz_hint=nnz)),
        "auto_hint_down": cuda_time(lambda: ffn_forward(x, g, u, dt, mode="auto", kernels="cuda", nnz_hint=nnz,
                                                        down=d)),
        "auto_down": cuda_time(lambda: ffn_forward(x, g, u, dt, mode="auto", kernels="cuda", down=d)),
        "dense_block_again": cuda_time(lambda: dense_block(x, g, u, d)),
    }
    print(m, nnz, {k: round(v, 3) for k, v in t.items()}, flush=True)
    del inp, x
