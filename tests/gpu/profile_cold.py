"""One launch of the hybrid's list pass per build (hybrid_order.py's LIST_BUILDS) and of its cold kernel reading
lists per build (COLD_BUILDS), on the packed layer at nnz ~29 and M = 65536 then 16384 (PROFILE_COLD_M), for Nsight
Compute (`bash tests/gpu/run_on_device.sh order`). The GEMMs in front run first; ncu is pointed at relu_list_kernel
and twell_ffn_kernel only, so each M gives one report per list-pass build, then one per cold-kernel build, in the
dictionaries' order."""

import os

import torch

from sparsify_cli.kernels import launchers
from hybrid_order import COLD_BUILDS, LIST_BUILDS  # tests/gpu, beside this script
from prefill_rows import packed_inputs

NNZ = 29
for m in (int(v) for v in os.environ.get("PROFILE_COLD_M", "65536,16384").split(",")):
    inp, pk = packed_inputs(m, NNZ)
    x = inp.x
    act = x @ pk.gate.T
    u = x @ pk.up[:pk.n_hot].T
    h_hot = torch.empty_like(u)
    lists = torch.empty(m, launchers.LIST_SLOTS, dtype=torch.int32, device="cuda")
    for name, extra in LIST_BUILDS.items():
        print(f"M = {m}: list pass, {name}", flush=True)
        launchers.launch_relu_list(act, pk.n_hot, u, h_hot, lists, extra)
    init = h_hot @ pk.down_t[:pk.n_hot]
    out = torch.empty_like(x)
    for name, extra in COLD_BUILDS.items():
        print(f"M = {m}: cold kernel, {name}", flush=True)
        launchers.launch_relu_ffn(x, act, pk.up, pk.down_t, out, c_start=pk.n_hot, init=init, lists=lists,
                                  defines=launchers.FFN_DEFAULT_DEFINES + extra)
    torch.cuda.synchronize()
    del inp, pk, x, act, u, h_hot, lists, init, out
    torch.cuda.empty_cache()
