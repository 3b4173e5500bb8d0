"""One launch of the hybrid's cold kernel reading lists per build (hybrid_order.py's COLD_BUILDS), on the packed
layer at M = 65536, nnz ~29, for Nsight Compute (`bash tests/gpu/run_on_device.sh order`). The list pass and the
GEMMs in front of it run first; ncu is pointed at twell_ffn_kernel only, so each build's launch is one report
(in COLD_BUILDS' order)."""

import torch

from sparsify_cli.bench.ffn import CALIB_TOKENS, D_MODEL, HIDDEN, calib_tokens, packed_layer
from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels import launchers, ops
from hybrid_order import COLD_BUILDS  # tests/gpu, beside this script

M, NNZ = 65536, 29
inp = make_ffn_inputs(M, D_MODEL, HIDDEN, NNZ, device="cuda", seed=NNZ + M)
pk = packed_layer(inp.gate, inp.up, inp.down.T.contiguous(), calib_tokens(CALIB_TOKENS, M + 1))
x = inp.x
act = x @ pk.gate.T
h_hot, lists = ops.relu_list(act, pk.n_hot, x @ pk.up[:pk.n_hot].T)
init = h_hot @ pk.down_t[:pk.n_hot]
out = torch.empty_like(x)
for name, extra in COLD_BUILDS.items():
    print(f"launch: {name}", flush=True)
    launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot, init=init, lists=lists,
                              defines=launchers.FFN_DEFAULT_DEFINES + extra)
torch.cuda.synchronize()
