"""The whole-model suite: a dense model and its packed (sparse-FFN) twin, side by side on the same tokens.

The two models come from bench/model_pair.py (a packed dir, a checkpoint, or synthetic weights).

Rows: prefill (batch × seq_len tokens, one forward), decode at batch 1…64 (one new token per sequence after
`context` tokens held in each model's KV cache, model/kv_cache.py) run eagerly, the same decode steps on a GPU
as CUDA-graph replays ("decode (graphs)", DecodeGraph: eager decode-sized calls keep the packed FFNs on their
dense path, kernels/ffn.py, while under a graph they run the sparse decode kernels; `graphs=false` leaves them out),
and one training step (forward, CE + λ·L1, backward, AdamW) of the dense model, timed twice: with every FFN on the
dense torch path, and with every FFN on the sparse training op (`FeedForward.sparse_train`, backend "cuda" on a
GPU — the CUDA op — and "torch", the pure-torch reference, on the CPU; ELL width per layer by the training loop's
rule, train/ffn_kernels.ell_width, from the layer's measured mean active count; width= overrides). On a GPU both
models run in bf16 (the training step: fp32 weights, bf16 autocast, as the trainer), on the CPU in fp32.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

import torch

from sparsify_cli.bench.measure import compare, rel_err
from sparsify_cli.bench.model_pair import Models, load_models, measure_nnz, random_tokens
from sparsify_cli.config.schema import OptimConfig
from sparsify_cli.errors import UserError
from sparsify_cli.model.transformer import SparseLlama

L1_COEFF = 2e-5  # the paper's λ, for the training step's loss


def sparse_under_graph(ffn, m: int) -> bool:
    """Whether ffn_forward's policy runs PackedFFN `ffn` on its sparse kernels for m tokens under a CUDA graph
    (where the eager decode rule does not apply): decided from the layer's calibrated nnz_hint, as PackedFFN
    passes it, under the layer's own rule (ffn.policy: this GPU's, packed.use_backend)."""
    fused = ffn.policy.takes_fused_decode(m, ffn.down_t.shape[1], ffn.nnz_hint is not None)
    return ffn.width > 0 and ffn.policy.choose_sparse(m, ffn.nnz_hint, ffn.width, fused=fused)


class DecodeGraph:
    """One decode step of `model` captured in a CUDA graph, to be replayed.

    `tokens` (B, 1) holds the new token of each sequence, `context` (B, ctx) or None the tokens before them,
    prefilled eagerly into a KV cache of the model's own (capacity ctx + 1). The graph holds one step at the fixed
    position ctx: the rotary rows, the cache slot written and the attended length are baked into it. forward
    advances `cache.length` on the host (the graph does not read it), so step() and replay() rewind it to ctx
    first. replay() returns the graph's static logits (B, 1, V), overwritten by the next replay.

    Capture as torch.cuda.graphs asks: warm-up steps on a side stream first (cuBLAS handles, the attention
    kernels, the CuPy modules). Eagerly a packed FFN takes its dense path at decode sizes, so the first warm-up
    step runs the packed FFNs that the graph will run sparse (sparse_under_graph) with mode="sparse": the kernels
    the capture records are then compiled and loaded before it. Nothing in the step reads back to the host: the
    position and KVCache.check_append are host integers, and PackedFFN passes its calibrated nnz_hint, so the
    policy never calls estimate_nnz (whose .item() would fail the capture).
    """

    def __init__(self, model: SparseLlama, tokens: torch.Tensor, context: Optional[torch.Tensor] = None,
                 warmup: int = 2):
        from sparsify_cli.model import KVCache
        from sparsify_cli.pack.packed import PackedFFN

        self.model = model
        self.ctx = 0 if context is None else context.shape[1]
        self.tokens = tokens.clone()  # the graph's static input (B, 1)
        dtype = next(model.parameters()).dtype
        self.cache = KVCache.allocate(model.cfg, tokens.shape[0], self.ctx + 1, tokens.device, dtype)
        if self.ctx:
            model(context, self.cache)
        packed = [f for f in model.ffns if isinstance(f, PackedFFN) and sparse_under_graph(f, tokens.shape[0])]
        side = torch.cuda.Stream(tokens.device)
        side.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(side):
            modes = [f.mode for f in packed]
            try:
                for f in packed:
                    f.mode = "sparse"
                self.step()
            finally:
                for f, mode in zip(packed, modes):
                    f.mode = mode
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream(tokens.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.cache.length = self.ctx
        with torch.cuda.graph(self.graph):
            self.out = self.model(self.tokens, self.cache)  # recorded, not run: replay() fills it
        self.cache.length = self.ctx

    def step(self) -> torch.Tensor:
        """The same step run eagerly (a packed model's FFNs then take the dense path at decode sizes)."""
        self.cache.length = self.ctx
        return self.model(self.tokens, self.cache)

    def replay(self) -> torch.Tensor:
        self.cache.length = self.ctx
        self.graph.replay()
        return self.out


class ModelSuite:
    """The model suite's rows, built lazily: the models are loaded by the first row that needs them."""

    def __init__(self, settings, source: Optional[str], device: torch.device, energy=None, say=lambda s: None):
        self.settings, self.source, self.device, self.energy, self.say = settings, source, device, energy, say
        self.models: Optional[Models] = None
        self.stats: dict[str, Any] = {}

    def cases(self) -> list[tuple[str, Any]]:
        s = self.settings
        out = [(f"prefill {s.batch}×{s.seq_len}", self.prefill)]
        out += [(f"decode batch {b}", lambda b=b: self.decode(b)) for b in s.decode]
        if self.graphs_status()[0]:
            out += [(f"decode batch {b} (CUDA graphs)", lambda b=b: self.decode_graphs(b)) for b in s.decode]
        out.append((f"train step {s.train_batch}×{s.seq_len} (dense vs sparse)", self.train_step))
        return out

    def graphs_status(self) -> tuple[bool, str]:
        """Whether the decode rows also run as CUDA-graph replays, and if not, why."""
        if not self.settings.graphs:
            return False, "graphs=false"
        if self.device.type != "cuda":
            return False, "CUDA graphs need a GPU (--device cuda)"
        return True, ""

    def notes(self) -> list[str]:
        """Where the sparse model's dense/sparse rule came from, and what the suite left out and why (the report
        header's notes)."""
        out = [self.models.policy_note] if self.models is not None and self.models.policy_note else []
        ok, why = self.graphs_status()
        if ok or not self.settings.decode:
            return out
        return out + [f"decode (graphs): not run ({why}); the decode rows ran eagerly"]

    def _ensure(self) -> Models:
        if self.models is None:
            self.models = load_models(self.settings, self.source, self.device, self.say)
            cfg = self.models.dense.cfg
            if self.settings.seq_len > cfg.max_seq_len:
                raise UserError(f"seq_len={self.settings.seq_len} exceeds the model's max_seq_len={cfg.max_seq_len}")
            tokens = self._tokens(self.settings.batch, self.settings.seq_len, 1)
            self.stats, per_layer = measure_nnz(self.models.dense, tokens)
            for ffn, nnz in zip(self.models.sparse.ffns, per_layer):
                if self.models.source == "checkpoint":  # packed layers have hints from their calibration
                    ffn.nnz_hint = nnz
        return self.models

    def info(self) -> dict[str, Any]:
        m = self._ensure()
        cfg = m.dense.cfg
        return {"model_source": m.source, "model": m.description, "ffn_backend": m.backend,
                "model_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "rope_scaling"},
                "parameters": m.dense.num_parameters()}

    def _tokens(self, batch: int, seq_len: int, salt: int) -> torch.Tensor:
        return random_tokens(self._ensure().dense.cfg.vocab_size, batch, seq_len, self.settings.seed + salt,
                             self.device)

    def _base(self, kind: str, tokens: torch.Tensor) -> dict[str, Any]:
        """The row's shape and the active neurons per token measured on its own tokens (all layers)."""
        m = self._ensure()
        cfg = m.dense.cfg
        stats = measure_nnz(m.dense, tokens)[0]
        return {"kind": kind, "M": tokens.numel(), "D": cfg.d_model, "H": cfg.d_ffn, "layers": cfg.n_layers, **stats}

    def _compare(self, kind: str, tokens: torch.Tensor) -> dict[str, Any]:
        m = self._ensure()
        row = self._base(kind, tokens)
        with torch.inference_mode():
            row.update(compare(lambda: m.dense(tokens), lambda: m.sparse(tokens), device=self.device,
                               tokens=tokens.numel(), reps=self.settings.reps, warmup=self.settings.warmup,
                               energy=self.energy))
        row["sparse_path"] = f"PackedFFN ({m.backend})"
        return row

    def prefill(self) -> dict[str, Any]:
        row = self._compare("prefill", self._tokens(self.settings.batch, self.settings.seq_len, 1))
        row["batch"], row["seq_len"] = self.settings.batch, self.settings.seq_len
        return row

    def decode(self, batch: int) -> dict[str, Any]:
        """One decode step: a new token per sequence after `context` tokens held in each model's KV cache (filled
        by that model's own prefill); each repetition rewinds the cache to the context, so all time the same step."""
        from sparsify_cli.model import KVCache

        m = self._ensure()
        ctx = self.settings.context
        step_tokens = self._tokens(batch, 1, 2)
        row = self._base("decode", step_tokens)
        dtype = next(m.dense.parameters()).dtype
        steps = []
        with torch.inference_mode():
            for model in (m.dense, m.sparse):
                cache = KVCache.allocate(model.cfg, batch, ctx + 1, self.device, dtype)
                if ctx:
                    model(self._tokens(batch, ctx, 4), cache)

                def step(model=model, cache=cache):
                    cache.length = ctx
                    return model(step_tokens, cache)

                steps.append(step)
            row.update(compare(steps[0], steps[1], device=self.device, tokens=step_tokens.numel(),
                               reps=self.settings.reps, warmup=self.settings.warmup, energy=self.energy))
            del steps
        row["sparse_path"] = f"PackedFFN ({m.backend})"
        row["context"] = ctx
        row["notes"] = (f"one new token per sequence after {ctx} cached tokens (KV cache), run eagerly: no CUDA "
                        "graphs, so at these sizes the packed FFNs take their dense path (kernels/ffn.py)")
        return row

    def decode_graphs(self, batch: int) -> dict[str, Any]:
        """The decode row's step (same tokens, same context) captured once per model in a CUDA graph
        (DecodeGraph) and timed as replays; rel err: the sparse graph's logits against the dense graph's."""
        m = self._ensure()
        ctx = self.settings.context
        step_tokens = self._tokens(batch, 1, 2)
        row = self._base("decode (graphs)", step_tokens)
        with torch.inference_mode():
            context = self._tokens(batch, ctx, 4) if ctx else None
            dense, sparse = DecodeGraph(m.dense, step_tokens, context), DecodeGraph(m.sparse, step_tokens, context)
            eager = dense.step().clone()
            # the dense model's replay against its own eager step: the same computation, so ~0 (a check that the
            # graph replays the step at position ctx it should)
            row["replay_vs_eager_err"] = rel_err(dense.replay(), eager)
            del eager
            row.update(compare(dense.replay, sparse.replay, device=self.device, tokens=step_tokens.numel(),
                               reps=self.settings.reps, warmup=self.settings.warmup, energy=self.energy))
        # a replay allocates nothing (its memory was reserved at capture): compare's peak would read 0
        row["dense_peak_mb"] = row["sparse_peak_mb"] = None
        n_sparse = sum(m.backend == "cuda" and sparse_under_graph(f, batch) for f in m.sparse.ffns)
        row["sparse_layers"] = n_sparse
        row["sparse_path"] = (f"PackedFFN ({m.backend}) in a CUDA graph: sparse kernels in {n_sparse}/"
                              f"{len(m.sparse.ffns)} layers")
        row["context"] = ctx
        row["notes"] = (f"decode (graphs): one decode step at the fixed position {ctx} (a new token per sequence after "
                        f"{ctx} cached tokens) captured once per model in a CUDA graph and timed as g.replay(), the "
                        "cache rewound to the context before each replay; under the graph the sparse model's FFNs "
                        "run the sparse decode kernels (in sparse_layers of the layers: those whose calibrated "
                        "density the policy takes sparse), not the dense path of eager decode; rel err: the sparse "
                        "graph's logits vs the dense graph's; peak memory: not measured (a replay allocates nothing)")
        del dense, sparse
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return row

    def train_step(self) -> dict[str, Any]:
        """One optimizer step of a copy of the dense model (fp32 weights, bf16 autocast on a GPU, as the trainer),
        first with dense FFNs, then with every FFN on the sparse training op: same weights, same tokens.

        Before the timing, one forward + backward of each gives the row's error: the sparse loss and gradients
        against the dense ones. The optimizer runs with lr 0, so every repetition sees the same weights (the same
        sparsity) while AdamW does its full work."""
        from sparsify_cli.bench.train_ffn import cuda_op_status, ell_width

        m = self._ensure()
        s = self.settings
        x = self._tokens(s.train_batch, s.seq_len, 3)
        row = self._base("train", x)
        per_layer = measure_nnz(m.dense, x)[1]
        widths = [s.width or ell_width(nnz) for nnz in per_layer]
        backend = "cuda" if self.device.type == "cuda" else "torch"
        ok, why = cuda_op_status() if backend == "cuda" else (True, "")

        dense = self._train_copy(None, widths, backend)
        loss_d, grads_d, nnz_d = dense.loss_and_grads(x)
        row.update(compare(dense.step(x), None, device=self.device, tokens=x.numel(), reps=s.reps,
                           warmup=s.warmup, energy=self.energy, check=False))
        del dense
        row.update(sparse_width=widths, sparse_backend=backend if ok else None, sparse_path=None)
        if not ok:
            row["notes"] = f"dense only: the CUDA training op cannot run here ({why})"
            return row
        sparse = self._train_copy(True, widths, backend)
        loss_s, grads_s, nnz_s = sparse.loss_and_grads(x)
        num = sum(float((a - b).double().pow(2).sum()) for a, b in zip(grads_s, grads_d))
        den = sum(float(b.double().pow(2).sum()) for b in grads_d)
        row["rel_err"] = (num / den) ** 0.5 if den > 0 else 0.0  # all parameters' gradients, one vector
        del grads_s, grads_d  # a model's worth of fp32 each: not held while the sparse step is timed
        timed = compare(sparse.step(x), None, device=self.device, tokens=x.numel(), reps=s.reps, warmup=s.warmup,
                        energy=self.energy, check=False)
        del sparse
        for key in ("ms", "tok_s", "peak_mb", "mj_tok"):
            row[f"sparse_{key}"] = timed[f"dense_{key}"]
        row["speedup"] = row["dense_ms"] / row["sparse_ms"]
        row["loss_dense"], row["loss_sparse"] = loss_d, loss_s
        # active neurons per token as the tracker counted them in the training forward: from h (dense) and from the
        # op's own counts (observe_sparse); they differ only by bf16 rounding of the gate under autocast
        row["dense_nnz_mean"], row["sparse_nnz_mean"] = nnz_d, nnz_s
        row["sparse_path"] = f"FeedForward.sparse_train, sparse_ffn_train(backend={backend!r}), widths per layer"
        row["notes"] = ("training step (forward, CE + λ·L1, backward, clip, AdamW at lr 0): dense FFNs vs every FFN "
                        "on the sparse training op" + (" (the pure-torch reference on the CPU)"
                                                       if backend == "torch" else "")
                        + "; rel err = ‖g_sparse − g_dense‖/‖g_dense‖ over all gradients; dense and sparse timed "
                        "one after the other (two training copies side by side would not fit the paper preset)"
                        + ("; both compiled (train.compile: decoder blocks and loss; FFN blocks eager)"
                           if s.compile else ""))
        row["compile"] = s.compile
        return row

    def _train_copy(self, sparse: Optional[bool], widths: list[int], backend: str) -> "_TrainCopy":
        model = copy.deepcopy(self._ensure().dense).float().train()
        if sparse:
            for ffn, width in zip(model.ffns, widths):
                ffn.sparse_train, ffn.sparse_backend, ffn.sparse_width = True, backend, width
        return _TrainCopy(model, self.device, self.settings.compile)


class _TrainCopy:
    """A model being trained as the trainer does it: AdamW (lr 0, see ModelSuite.train_step), the sparsity tracker
    as observer (the L1 term; with sparse FFNs it gets observe_sparse), bf16 autocast on a GPU."""

    def __init__(self, model: SparseLlama, device: torch.device, compile_blocks: bool = False):
        from sparsify_cli.sparsity import SparsityTracker
        from sparsify_cli.train import compile as compiling
        from sparsify_cli.train.optim import build_optimizer

        self.model, self.device = model, device
        self.cross_entropy = compiling.cross_entropy
        if compile_blocks:
            compiling.check_can_compile(device)
            self.cross_entropy = compiling.compile_blocks(model)
        self.opt = build_optimizer(model, OptimConfig())
        for group in self.opt.param_groups:
            group["lr"] = 0.0  # the same weights at every repetition; AdamW's work is unchanged
        self.tracker = SparsityTracker(model.cfg.n_layers, model.cfg.d_ffn, 1 << 30, device)
        model.set_observer(self.tracker)

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        from sparsify_cli.train.loop import autocast_for

        y = torch.roll(x, -1, dims=1)
        self.tracker.begin_forward(want_l1=True)
        with autocast_for(self.device, "auto"):
            logits = self.model(x)  # (B, T, V)
            return self.cross_entropy(logits, y) + L1_COEFF * self.tracker.end_forward()

    def loss_and_grads(self, x: torch.Tensor) -> tuple[float, list[torch.Tensor], float]:
        """One forward + backward, no optimizer step: the loss, every parameter's gradient (then cleared) and the
        mean active FFN neurons per token over layers, as the tracker counted them."""
        loss = self._loss(x)
        loss.backward()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for p in self.model.parameters()]
        self.opt.zero_grad(set_to_none=True)
        stats = self.tracker.layer_stats()
        self.tracker.reset_window_stats()
        return float(loss.detach()), grads, sum(st.mean_active for st in stats) / len(stats)

    def step(self, x: torch.Tensor):
        def run() -> torch.Tensor:
            loss = self._loss(x)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return loss.detach()

        return run
