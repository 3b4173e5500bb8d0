"""One launch of each kernel of the decode path above the fused path's tokens (decode_up_act_kernel, then
decode_down_kernel, no PDL, the segment lists on as launch_relu_ffn runs them) on a packed layer at 99.5% sparsity,
D 2048, H 5632, for `ncu` (development tool). Before session 22 it ran the pair without the segment lists, so the
down kernel listed the h row (sessions 20 and 21's profiles).

    ncu --kernel-name regex:decode_ --launch-skip 2 --section ... python3 tests/gpu/profile_decode.py [M]
"""

import sys

import torch

from sparsify_cli.bench.ffn import CALIB_TOKENS, calib_tokens, decode_layers, packed_layer
from sparsify_cli.kernels import launchers

m = int(sys.argv[1]) if len(sys.argv) > 1 else 64
sets, downs_t = decode_layers(m, 1, 500)
p = packed_layer(sets[0].gate, sets[0].up, downs_t[0], calib_tokens(CALIB_TOKENS, 7))
x = sets[0].x
act = x @ p.gate.T
out = torch.empty_like(x)
print(f"M={m} width={p.width} n_hot={p.n_hot} active pairs={int((act > 0).sum())} "
      f"distinct active neurons={int((act > 0).any(0).sum())}", flush=True)
seg = launchers.decode_seg_buffers(m, act.shape[1], x.device)
for _ in range(2):
    hbuf = launchers.launch_decode_up_act(x, act, p.up, seg=seg)
    launchers.launch_decode_down(hbuf, p.down_t, out, act.shape[1], seg=seg)
torch.cuda.synchronize()
