"""One launch of each sparse FFN kernel at M=16384, nnz~29 (D=2048, H=5632), for `ncu` (run_on_device.sh)."""

import torch

from sparsify_cli.bench.synthetic import make_ffn_inputs
from sparsify_cli.kernels import launchers, ops

inp = make_ffn_inputs(16384, 2048, 5632, 29, device="cuda", seed=1)
down_t = inp.down.T.contiguous()
act = inp.x @ inp.gate.T
words = ops.twell_pack(act, 256, 32)
out = torch.empty_like(inp.x)
for _ in range(2):
    launchers.launch_twell_ffn(inp.x, words, inp.up, down_t, act, out, 256)
    launchers.launch_twell_ffn(inp.x, words, inp.up, down_t, act, out, 256, split=True)
dec = make_ffn_inputs(1, 2048, 5632, 28, device="cuda", seed=2)
dec_down_t = dec.down.T.contiguous()
dec_act = dec.x @ dec.gate.T
for _ in range(2):
    ops.relu_ffn(dec.x, dec_act, dec.up, dec_down_t)
torch.cuda.synchronize()
