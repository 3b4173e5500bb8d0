"""The suites behind `sparsify bench`: which device, which rows, and the run that produces them.

    cpu    pure-torch sparse FFN (formats/) vs dense, fp32, decode (batch 1) and prefill, per density
    ffn    the CUDA kernels vs cuBLAS dense, bf16: bench/ffn.py's prefill and decode rows (PERFORMANCE.md's
           shapes and inputs), plus, per prefill row, ffn_forward as a packed model calls it, with peak memory
           and energy
    model  a dense model and its packed twin: prefill, decode at batch 1…64 (eager, and on a GPU as CUDA-graph
           replays), a training step dense vs the sparse training op (model.py)
    train  FFN forward + backward with the L1 term, dense torch autograd vs kernels.train_reference's
           sparse_ffn_train (the CUDA op on a GPU, the torch reference on the CPU): train_ffn.py
    policy dense vs the sparse path over a sweep of densities on this GPU; the crossovers become the GPU's
           dense/sparse rule, written to its policy file (policy.py, kernels/device_policy.py)

plan() checks everything a run needs (device, kernels, a model path) before any work, and returns the rows as
(label, callable) pairs, so the CLI can show a progress bar and the tests can run any one of them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from sparsify_cli.bench import settings as bench_settings
from sparsify_cli.bench.clocks import ClockWatch
from sparsify_cli.bench.energy import EnergyMeter
from sparsify_cli.bench.measure import compare, cuda_median_ms, nnz_stats, rel_err
from sparsify_cli.errors import UserError

Case = tuple[str, Callable[[], dict]]


def default_suite() -> tuple[str, str]:
    """(suite, device) for this machine: the ffn suite where the CUDA kernels can run, else the CPU suite."""
    from sparsify_cli.kernels import cuda_kernels_status

    ok, _ = cuda_kernels_status()
    return ("ffn", "cuda") if ok else ("cpu", "cpu")


def resolve_device(suite: str, device: Optional[str]) -> str:
    """The device of a run; cuda must be able to run the kernels (the reason says why not)."""
    from sparsify_cli.kernels import cuda_kernels_status

    if device is None:
        device = {"cpu": "cpu", "ffn": "cuda", "policy": "cuda"}.get(suite) or ("cuda" if cuda_kernels_status()[0] else "cpu")
    if device not in bench_settings.DEVICES:
        raise UserError(f"unknown device {device!r}; choose one of: {', '.join(bench_settings.DEVICES)}")
    if suite == "cpu" and device != "cpu":
        raise UserError("the cpu suite runs on the CPU (--device cpu); for the GPU use --suite ffn, model or train")
    if suite in ("ffn", "policy") and device != "cuda":
        raise UserError(f"the {suite} suite times the CUDA kernels (--device cuda); on the CPU use --suite cpu")
    if device == "cuda":
        ok, why = cuda_kernels_status()
        if not ok:
            raise UserError(f"--device cuda cannot run here: {why}")
    return device


def plan(s: bench_settings.BenchSettings, source: Optional[str] = None,
         say: Callable[[str], None] = lambda text: None) -> tuple[list[Case], Callable[[], dict[str, Any]]]:
    """The rows of a run as (label, callable) pairs, and a callable giving the run's extra header fields (to call
    after the rows). On a GPU each row also records the SM clock it ran at, and the header the run's (clocks.py)."""
    cases, header = _suite_plan(s, source, say)
    watch = ClockWatch(s.device)

    def header_with_clocks() -> dict[str, Any]:
        fields = header()
        clocks, notes = watch.finish()
        return {**fields, **clocks, "notes": fields["notes"] + notes}

    return [(label, watch.wrap(run)) for label, run in cases], header_with_clocks


def _suite_plan(s: bench_settings.BenchSettings, source: Optional[str],
                say: Callable[[str], None]) -> tuple[list[Case], Callable[[], dict[str, Any]]]:
    """plan() without the clocks: the suite's rows and its header fields."""
    if source is not None and s.suite != "model":
        raise UserError(f"a model path ({source}) only applies to --suite model")
    device = torch.device(s.device)
    energy = EnergyMeter(device)
    notes = [energy.note]
    if device.type == "cpu":
        notes.append("peak memory: not measured on the CPU (torch keeps no CPU allocation peak)")
    if s.suite == "cpu":
        from sparsify_cli.bench import cpu

        cases = [(f"{kind} M={m} nnz={nnz:g}", lambda kind=kind, m=m, nnz=nnz: cpu.suite_row(s, kind, m, nnz))
                 for kind, m, nnz in cpu.suite_cases(s)]
        return cases, lambda: {"notes": notes}
    if s.suite == "ffn":
        cases = [(f"prefill M={m} nnz={nnz:g}", lambda m=m, nnz=nnz: gpu_prefill_row(s, m, nnz, energy))
                 for m in s.tokens for nnz in s.nnz]
        cases += [(f"decode M={m}", lambda m=m: gpu_decode_row(s, m, energy)) for m in s.decode]
        if s.tokens and s.nnz:
            m, nnz = s.tokens[0], s.nnz[0]
            cases.append((f"train M={m} (dense)", lambda: ffn_train_row(s, m, nnz, device, energy)))
        return cases, lambda: {"notes": notes}
    if s.suite == "policy":
        from sparsify_cli.bench.policy import PolicySuite

        policy = PolicySuite(s)

        def header() -> dict[str, Any]:  # after the rows: the crossovers, written as this GPU's rule
            fields = policy.finish()
            return {**fields, "notes": notes + fields["notes"]}

        return policy.cases(), header
    if s.suite == "train":
        from sparsify_cli.bench import train_ffn

        cases = train_ffn.cases(s, device, energy)  # refuses a backend that cannot run here, before any work
        fields, train_notes = train_ffn.header(s)
        return cases, lambda: {"notes": notes + train_notes, **fields}
    from sparsify_cli.bench.model import ModelSuite

    suite = ModelSuite(s, source, device, energy, say)
    return suite.cases(), lambda: {"notes": notes + suite.notes(), **suite.info()}


@contextlib.contextmanager
def cpu_threads(s: bench_settings.BenchSettings):
    """torch's intra-op threads set to ``threads=`` (when given) for the run, restored after it."""
    before = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ffn_train_row(s, m: int, nnz: float, device: torch.device, energy: Optional[EnergyMeter] = None) -> dict:
    """Forward + backward of the FFN block with the L1 term, dense torch eager (PERFORMANCE.md's training anchor):
    the dense baseline only; the train suite (train_ffn.py) times it against the sparse training op."""
    from sparsify_cli.bench.synthetic import make_ffn_inputs

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inp = make_ffn_inputs(m, s.d_model, s.d_ffn, nnz, device=device, dtype=dtype, seed=int(nnz) + m)
    x, gate, up, down = (t.detach().requires_grad_() for t in (inp.x, inp.gate, inp.up, inp.down))
    gy = torch.randn(m, s.d_model, device=device, dtype=dtype, generator=torch.Generator(device).manual_seed(1))

    def step():
        a = x @ gate.T  # (M, H)
        h = torch.relu(a) * (x @ up.T)  # (M, H)
        out = h @ down.T  # (M, D)
        loss = (out.float() * gy.float()).sum() + 2e-5 * h.float().abs().sum(1).mean()
        loss.backward()
        for t in (x, gate, up, down):
            t.grad = None
        return loss.detach()

    row = {"kind": "train", "M": m, "D": s.d_model, "H": s.d_ffn, "nnz_target": nnz,
           **nnz_stats((inp.x @ inp.gate.T).detach())}
    row.update(compare(step, None, device=device, tokens=m, reps=s.reps, warmup=s.warmup, energy=energy, check=False))
    row["sparse_path"] = None
    row["notes"] = ("train: FFN forward + backward with the L1 term, dense torch eager only; dense vs the sparse "
                    "training op: sparsify bench --suite train")
    return row


# ---- the GPU FFN rows (bench/ffn.py owns the kernel-level timings; this adds the common columns) ----------------


def gpu_prefill_row(s, m: int, nnz: float, energy: Optional[EnergyMeter] = None) -> dict:
    """bench/ffn.py's prefill row (every kernel variant, kept under "detail"), then dense vs ffn_forward as a
    packed model calls it (auto policy, calibrated nnz hint) on the same inputs (same seed) with peak memory and
    energy."""
    from sparsify_cli.bench import ffn
    from sparsify_cli.bench.synthetic import make_ffn_inputs
    from sparsify_cli.kernels import ffn_forward

    detail = ffn.prefill_row(m, nnz, s.reps) if s.detail else None
    inp = make_ffn_inputs(m, ffn.D_MODEL, ffn.HIDDEN, nnz, device="cuda", seed=int(nnz) + m)  # prefill_row's seed
    x, gate, up, down = inp.x, inp.gate, inp.up, inp.down
    row = {"kind": "prefill", "M": m, "D": ffn.D_MODEL, "H": ffn.HIDDEN, "nnz_target": nnz, **nnz_stats(x @ gate.T)}
    # Neuron order and hints from firing rates on calibration tokens (the recipe's, apart from the timed ones), as
    # `sparsify pack` measures them: hot-first order, Downᵀ rows; the hints: the calibrated mean over all neurons,
    # and over the cold ones (what the hybrid path leaves to the sparse kernel), as PackedFFN passes them.
    # The main columns keep every neuron (the same function as dense, exactly); the packed_* columns time the
    # layer as pack lays it out, without the neurons that never fired on the calibration tokens.
    from sparsify_cli.kernels.ffn import hot_first_order

    calib = ffn.calib_tokens(ffn.CALIB_TOKENS, m + 1)
    rates = ((calib @ gate.T) > 0).float().mean(0)  # (H,)
    perm, n_hot = hot_first_order(rates)
    gate_p, up_p, down_t = gate[perm].contiguous(), up[perm].contiguous(), down.T[perm].contiguous()
    hint, cold_hint = float(rates.sum()), float(rates[perm][n_hot:].sum())

    def dense():
        return ffn.dense_block(x, gate, up, down)

    row.update(compare(dense,
                       lambda: ffn_forward(x, gate_p, up_p, down_t, kernels="cuda", mode="auto", nnz_hint=hint,
                                           cold_nnz_hint=cold_hint, n_hot=n_hot),
                       device=torch.device("cuda"), tokens=m, reps=s.reps, warmup=s.warmup, energy=energy))
    row["n_hot"] = n_hot
    row["sparse_path"] = ("kernels.ffn_forward on the layer in hot-first order, every neuron kept (auto policy, "
                          "calibrated nnz hints), bf16")
    pk = ffn.packed_layer(gate, up, down.T.contiguous(), calib)
    del calib

    def packed():
        return ffn_forward(x, pk.gate, pk.up, pk.down_t, kernels="cuda", mode="auto", nnz_hint=pk.nnz_hint,
                           cold_nnz_hint=pk.cold_nnz_hint, n_hot=pk.n_hot)

    with torch.no_grad():
        row["packed_rel_err"] = rel_err(packed(), dense())
    row["packed_ms"] = cuda_median_ms({"packed": packed}, s.reps, s.warmup)["packed"]
    row.update(packed_speedup=row["dense_ms"] / row["packed_ms"], packed_width=pk.width, packed_n_hot=pk.n_hot,
               packed_removed_share=ffn.removed_share(x, gate, pk.kept),
               packed_path=("the layer as `sparsify pack` lays it out: neurons silent on the calibration tokens "
                            "removed (packed_removed_share of the timed tokens' activations fell on them), "
                            "hot-first order"))
    del pk
    if detail is not None:
        row["kernel_sparse_ms"] = detail["sparse_ms"]  # the fused sparse kernel, always sparse
        row["kernel_speedup"] = detail["speedup"]
        row["rel_err_fp32_ref"] = detail["rel_err_sparse"]
        row["rel_err_torch_bf16"] = detail["rel_err_torch_bf16"]
        row["detail"] = detail
    del inp, x, gate, up, down, down_t, gate_p, up_p
    torch.cuda.empty_cache()
    return row


def gpu_decode_row(s, m: int, energy: Optional[EnergyMeter] = None) -> dict:
    """bench/ffn.py's decode row (CUDA-graph replays over 4 layers' weights, so weights are not L2-resident):
    its times are the row's; peak memory and energy come from eager calls of its first layer's inputs."""
    from sparsify_cli.bench import ffn
    from sparsify_cli.bench.synthetic import make_ffn_inputs
    from sparsify_cli.kernels import ffn_forward
    from sparsify_cli.bench.measure import peak_mb

    d = ffn.decode_row(m, s.reps)
    row = {k: d[k] for k in ("kind", "M", "D", "H", "nnz_target", "nnz_mean", "nnz_max", "max_per_tile")}
    row["sparsity"] = 1.0 - d["nnz_mean"] / d["H"]
    inp = make_ffn_inputs(m, ffn.D_MODEL, ffn.HIDDEN, d["nnz_target"], device="cuda", seed=100)  # its layer 0
    x, gate, up, down = inp.x, inp.gate, inp.up, inp.down
    down_t = down.T.contiguous()

    def dense():
        return ffn.dense_block(x, gate, up, down)

    def sparse():
        # mode="sparse": run eagerly, "auto" would take the dense path at decode (SparsePolicy.eager_decode_dense)
        return ffn_forward(x, gate, up, down_t, kernels="cuda", mode="sparse", nnz_hint=d["nnz_mean"])

    with torch.no_grad():
        row["rel_err"] = rel_err(sparse(), dense())
    row.update(packed_ms=d["packed_ms"], packed_speedup=d["speedup_packed"], packed_width=d["packed_width"],
               packed_removed_share=d["packed_removed_share"], packed_rel_err_fp32_ref=d["rel_err_packed"])
    row.update(dense_ms=d["dense_ms"], sparse_ms=d["sparse_ms"], speedup=d["speedup"],
               dense_tok_s=m / d["dense_ms"] * 1e3, sparse_tok_s=m / d["sparse_ms"] * 1e3,
               dense_peak_mb=peak_mb(dense, torch.device("cuda")), sparse_peak_mb=peak_mb(sparse, torch.device("cuda")),
               dense_mj_tok=energy.mj_per_token(dense, m, d["dense_ms"]) if energy else None,
               sparse_mj_tok=energy.mj_per_token(sparse, m, d["sparse_ms"]) if energy else None,
               rel_err_fp32_ref=d["rel_err_sparse"], rel_err_torch_bf16=d["rel_err_torch_bf16"], detail=d,
               sparse_path=f"{d['sparse_path']} (CUDA graphs, 4 layers)",
               notes="times: CUDA-graph replays (bench/ffn.py); energy/memory: eager calls of one layer")
    del inp, x
    torch.cuda.empty_cache()
    return row
