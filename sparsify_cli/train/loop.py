"""The training loop: CE + λ·L1 on FFN activations, AdamW, checkpoints that resume exactly."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparsify_cli.config.schema import RunConfig
from sparsify_cli.errors import UserError
from sparsify_cli.model import hf
from sparsify_cli.model.transformer import SparseLlama
from sparsify_cli.sparsity import SparsityTracker, l1_coefficient, summarize
from sparsify_cli.sparsity.dead import reinit_dead_neurons
from sparsify_cli.train import checkpoint as ckpt
from sparsify_cli.train import compile as compiling
from sparsify_cli.train import distributed as dist
from sparsify_cli.train.ffn_kernels import SparseLayerPolicy, fit_to_size, resolve_train_kernels
from sparsify_cli.train.metrics import MetricsSink
from sparsify_cli.train.optim import build_optimizer, flatten_moments, lr_at, unflatten_moments
from sparsify_cli.train.progress import TrainProgress


class TrainingDiverged(UserError):
    """The loss became NaN/inf; the message names the step and, where found, the first bad layer."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_ce: float
    heldout_ce: float
    sparsity: dict[str, float]  # summarize() of the held-out pass
    layers: list[dict[str, float]]  # per-layer held-out statistics


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """train.device; under torchrun, "auto"/"cuda" mean this process's GPU (LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but no CUDA GPU is visible to torch")
    return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on GPU (auto or bf16), plain fp32 elsewhere."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def take_peak_memory_gib(device: torch.device) -> float | None:
    """The most memory torch allocated on `device` since the previous call (GiB), then a fresh window; None off
    CUDA. The trainer logs it at each log line as memory/peak_gib (this process's GPU)."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def load_init(path: str, allow_torch_bin: bool = False, weights: bool = True) -> hf.Imported:
    """train.init: a local Hugging Face directory, or a run/checkpoint directory of ours."""
    if hf.is_hf_dir(path):
        return hf.load_hf(path, allow_torch_bin, weights)
    if not Path(path).expanduser().exists():
        raise UserError(f"train.init={path} does not exist")
    ckpt_dir = ckpt.resolve_checkpoint_dir(Path(path).expanduser())
    model, _ = ckpt.load_model(ckpt_dir)
    return hf.Imported(model.cfg, model.state_dict() if weights else None, str(ckpt_dir / "tokenizer.json"))


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: str | Path, resume: bool = False, console=None):
        from sparsify_cli.data import BatchSampler, prepare_data

        tc = cfg.train
        if tc.init_required and not tc.init:
            raise UserError(
                f"run {cfg.run_name!r} fine-tunes a pretrained model: give its checkpoint with --init PATH "
                "(train.init=PATH: a local Hugging Face directory or a sparsify run)"
            )
        self.dist = dist.env_world()
        dist.check_batch_split(tc.batch_size, tc.grad_accum, self.dist.world)
        # Only rank 0 talks to the console, the metrics file and W&B.
        self.cfg, self.run_dir, self.console = cfg, Path(run_dir), console if self.dist.is_main else None
        self.device = resolve_device(cfg.train.device, self.dist.local_rank)
        # train.kernels: kernels=cuda that cannot run stops here, before any work (train/ffn_kernels.py).
        self.kernels = resolve_train_kernels(tc.kernels, self.device, tc.precision, cfg.model.activation)
        if self.kernels.note:
            self._say(self.kernels.note)
        if tc.compile:
            compiling.check_can_compile(self.device)
        dist.init_distributed(self.device)
        resume_ckpt = self._checkpoint_to_resume() if resume else None
        # train.init: shape, weights and tokenizer from a checkpoint (its weights are not needed to resume).
        init = load_init(tc.init, tc.allow_torch_bin, weights=resume_ckpt is None) if tc.init else None
        tokenizer_path = str(resume_ckpt / "tokenizer.json") if resume_ckpt else (init.tokenizer_path if init else None)
        if init and tokenizer_path is None and cfg.data.tokenizer_path is None:
            raise UserError(f"train.init={tc.init} has no tokenizer.json; give its tokenizer as data.tokenizer_path")
        self.data = prepare_data(cfg.data, tokenizer_path=tokenizer_path, progress=self._say)
        self._say(self.data.description)

        torch.manual_seed(tc.seed)
        base_cfg = dataclasses.replace(init.config, activation=cfg.model.activation) if init else cfg.model
        model_cfg = dataclasses.replace(base_cfg, vocab_size=base_cfg.vocab_size or self.data.vocab_size)
        if model_cfg.vocab_size < self.data.vocab_size:
            raise UserError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {self.data.vocab_size}")
        if tc.seq_len > model_cfg.max_seq_len:
            raise UserError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
        self.model = SparseLlama(model_cfg)
        if init and init.state_dict is not None:
            self.model.load_state_dict(init.state_dict)
            self._say(f"initialized from {tc.init} (FFN activation {model_cfg.activation})")
        self.model.to(self.device)
        self.model.activation_checkpointing = tc.activation_checkpointing
        # `engine` runs forward/backward (DDP/FSDP2 around the model, or the model itself on one process).
        self.engine = dist.wrap(self.model, tc.parallel, self.dist, self.device, self._bf16)
        self.cross_entropy = compiling.cross_entropy
        if tc.compile:  # after wrapping: FSDP2 shards each block first, then each block is compiled
            self.cross_entropy = compiling.compile_blocks(self.model)
            self._say("train.compile: decoder blocks and the loss compiled (FFN blocks eager); the first steps compile")
        self.optimizer = build_optimizer(self.engine, cfg.optim)
        self.tracker = SparsityTracker(
            model_cfg.n_layers, model_cfg.d_ffn, cfg.sparsity.dead_window_tokens, self.device, token_scale=self.dist.world
        )
        self.model.set_observer(self.tracker)
        # the model's size is known only now (train.init may set it): auto stays dense where the op cannot pay
        micro_tokens = tc.batch_size // (tc.grad_accum * self.dist.world) * tc.seq_len
        self.kernels, note = fit_to_size(self.kernels, micro_tokens, model_cfg.d_model, model_cfg.d_ffn)
        if note:
            self._say(note)
        # kernels=cuda: the per-layer dense/sparse choice, made before each step (None: every FFN dense).
        self.ffn_policy = (
            SparseLayerPolicy(model_cfg.n_layers, model_cfg.d_ffn) if self.kernels.resolved == "cuda" else None
        )
        # The global batch of each step; every rank takes its slice (distributed.py explains).
        self.sampler = BatchSampler(self.data.train_tokens, tc.batch_size, tc.seq_len, tc.seed)
        self.reinit_gen = torch.Generator().manual_seed(tc.seed + 1)
        self.step = 0
        wandb_id = None
        if resume_ckpt is not None:
            wandb_id = self._restore(resume_ckpt)
        elif (self.run_dir / ckpt.CHECKPOINT_SUBDIR).exists():
            raise UserError(f"{self.run_dir} already holds a checkpoint: pass --resume to continue it, or choose another --out")
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
        self.sink = MetricsSink(
            self.run_dir, cfg.logger.jsonl and self.dist.is_main,
            cfg.logger.wandb if self.dist.is_main else dataclasses.replace(cfg.logger.wandb, mode="disabled"),
            cfg.run_name, {**self._run_config_dict(), "train_kernels": self.kernels.resolved}, wandb_id, warn=self._say,
        )

    @property
    def _bf16(self) -> bool:
        p = self.cfg.train.precision
        return p == "bf16" or (p == "auto" and self.device.type == "cuda")

    # ---- resume ------------------------------------------------------------------------------------------
    def _checkpoint_to_resume(self) -> Path:
        path = self.run_dir / ckpt.CHECKPOINT_SUBDIR
        if not path.exists():
            raise UserError(f"--resume: no checkpoint in {self.run_dir} to resume from")
        return ckpt.resolve_checkpoint_dir(path)

    def _restore(self, path: Path) -> str | None:
        config = ckpt.read_config(path)
        saved_model = config["model"]
        current = dataclasses.asdict(self.model.cfg)
        diffs = [k for k in current if saved_model.get(k, current[k]) != current[k]]  # absent: newer than the checkpoint
        if diffs:
            k = diffs[0]
            raise UserError(f"--resume: model.{k} is {current[k]!r} now but {saved_model.get(k)!r} in {path}; the model cannot change")
        if config.get("data_fingerprint") != self.data.fingerprint:
            raise UserError(f"--resume: the training data differs from the data {path} was trained on")
        model, _ = ckpt.load_model(path)
        state, tensors = ckpt.load_trainer_state(path)
        dist.load_state(self.engine, self.optimizer, model.state_dict(), unflatten_moments(tensors))
        self.tracker.load_state_dict({"tokens_seen": state["tokens_seen"], "last_fired": tensors["tracker/last_fired"]})
        self.sampler.load_state_dict(state["sampler"])
        self.reinit_gen.set_state(tensors["rng/reinit"])
        torch.set_rng_state(tensors["rng/torch"])
        if self.device.type == "cuda" and "rng/cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng/cuda"], self.device)
        self.step = int(state["step"])
        self._say(f"resumed from {path} at step {self.step}")
        return state.get("wandb_id")

    def _trim_metrics(self) -> None:
        """Drop metric lines past the resumed step (written after the last checkpoint of an interrupted run)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= self.step]
        path.write_text("".join(line + "\n" for line in keep))

    def _run_config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(dataclasses.replace(self.cfg, model=self.model.cfg))

    # ---- checkpoints -------------------------------------------------------------------------------------
    def save(self) -> Path | None:
        """Every rank takes part (gathering is collective); rank 0 writes. Returns the path on rank 0."""
        weights, moments = dist.gather_state(self.engine, self.optimizer)
        self.tracker.sync_clock()
        if not self.dist.is_main:
            dist.barrier()
            return None
        tensors = flatten_moments(moments)
        tensors["tracker/last_fired"] = self.tracker.last_fired
        tensors["rng/reinit"] = self.reinit_gen.get_state()
        tensors["rng/torch"] = torch.get_rng_state()
        if self.device.type == "cuda":
            tensors["rng/cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": self.step,
            "tokens_seen": self.tracker.tokens_seen,
            "sampler": self.sampler.state_dict(),
            "wandb_id": self.sink.wandb_id,
        }
        extra = {
            "data_fingerprint": self.data.fingerprint,
            "data_description": self.data.description,
            "train_kernels": self.kernels.resolved,  # what train.kernels resolved to: torch or cuda
        }
        try:
            return ckpt.save_checkpoint(
                self.run_dir,
                self.model.cfg,
                self._run_config_dict(),
                self.data.tokenizer.to_str(),
                state,
                tensors,
                extra_config=extra,
                weights=weights,
            )
        finally:
            dist.barrier()

    # ---- the loop ----------------------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    def train_step(self) -> dict[str, float]:
        tc, sc = self.cfg.train, self.cfg.sparsity
        lam = l1_coefficient(self.step, sc.l1_coeff, sc.l1_warmup_steps)
        lr = lr_at(self.step, tc.max_steps, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        kernel_metrics = self._choose_ffn_kernels()
        self.engine.train()
        ce_sum = torch.zeros((), device=self.device)
        l1_sum = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(self._micro_batches()):
            last = i == tc.grad_accum - 1
            self.tracker.begin_forward(want_l1=True)
            with dist.no_grad_sync(self.engine, last), autocast_for(self.device, tc.precision):
                logits = self.engine(x)  # (B, T, V)
                ce = self.cross_entropy(logits, y)
                l1 = self.tracker.end_forward()
                loss = (ce + lam * l1) / tc.grad_accum
                # Every rank must agree to stop, or the others would wait forever in the next collective.
                finite = dist.all_reduce(torch.isfinite(loss.detach()).float(), "min")
                if not bool(finite):
                    raise TrainingDiverged(self._diverged_message(x, float(ce.detach()), float(l1.detach())))
                loss.backward()
            ce_sum += ce.detach()
            l1_sum += l1.detach()
        # Log the global means (the same numbers one process would see).
        ce_sum = dist.all_reduce(ce_sum) / self.dist.world
        l1_sum = dist.all_reduce(l1_sum) / self.dist.world
        grad_norm = float("nan")
        if self.cfg.optim.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.engine.parameters(), self.cfg.optim.grad_clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: a DTensor
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        revived = self._maybe_reinit()
        return {
            "ce": float(ce_sum) / tc.grad_accum,
            "l1": float(l1_sum) / tc.grad_accum,
            "l1_coeff": lam,
            "lr": lr,
            "grad_norm": grad_norm,
            "revived": revived,
            **kernel_metrics,
        }

    def _choose_ffn_kernels(self) -> dict[str, float]:
        """kernels=cuda: set each FFN's path for this step from the previous step's statistics (all ranks alike:
        the statistics are reduced across them). Runs between optimizer steps only. Returns the step's metrics."""
        if self.ffn_policy is None:
            return {}
        n_sparse = self.ffn_policy.step(self.model.ffns, self.tracker.step_mean_active())
        metrics = {"kernels/sparse_layers": n_sparse}
        for i, layer in enumerate(self.ffn_policy.layers):
            metrics[f"layer{i}/ell_width"] = layer.width  # 0: dense
        return metrics

    def _micro_batches(self):
        """This rank's slice of the step's global batch, cut into grad_accum micro-batches."""
        tc, info = self.cfg.train, self.dist
        x, y = self.sampler.next_batch()  # (batch_size, T) each
        per_rank = tc.batch_size // info.world
        x, y = x[info.rank * per_rank:(info.rank + 1) * per_rank], y[info.rank * per_rank:(info.rank + 1) * per_rank]
        for xm, ym in zip(x.chunk(tc.grad_accum), y.chunk(tc.grad_accum)):
            yield xm.to(self.device, non_blocking=True), ym.to(self.device, non_blocking=True)

    def _maybe_reinit(self) -> int:
        sc = self.cfg.sparsity
        if not sc.reinit_dead or self.step % sc.reinit_every:
            return 0
        if sc.reinit_until and self.step > sc.reinit_until:
            return 0
        self.tracker.sync_clock()  # every rank decides from the same (global) firing record
        return reinit_dead_neurons(self.model, self.tracker, self.optimizer, self.reinit_gen)

    @torch.no_grad()
    def _diverged_message(self, x: torch.Tensor, ce: float, l1: float) -> str:
        bad_layer = None

        def find_bad(layer: int, h: torch.Tensor) -> None:
            nonlocal bad_layer
            if bad_layer is None and not torch.isfinite(h).all():
                bad_layer = layer

        self.model.set_observer(find_bad)
        try:
            with autocast_for(self.device, self.cfg.train.precision):
                self.model(x)
        finally:
            self.model.set_observer(self.tracker)
        where = f"first non-finite FFN activations in layer {bad_layer}" if bad_layer is not None else "FFN activations finite"
        return (
            f"loss became non-finite at step {self.step + 1} (CE={ce}, L1={l1}; {where}); "
            f"try a lower optim.lr or sparsity.l1_coeff. The last checkpoint is unchanged"
        )

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> tuple[float, dict[str, float], list[dict[str, float]]]:
        """Held-out CE and activation statistics over the first eval_batches windows of the held-out split."""
        from sparsify_cli.data import eval_batches

        tc = self.cfg.train
        tracker = SparsityTracker(self.model.cfg.n_layers, self.model.cfg.d_ffn, 1, self.device)
        self.model.set_observer(tracker)
        self.engine.eval()
        total, count = 0.0, 0
        try:
            micro = tc.batch_size // (tc.grad_accum * self.dist.world)
            batches = eval_batches(self.data.heldout_tokens, micro, tc.seq_len, max_batches or tc.eval_batches)
            for x, y in batches:
                x, y = x.to(self.device), y.to(self.device)
                tracker.begin_forward(want_l1=False)
                with autocast_for(self.device, tc.precision):
                    logits = self.engine(x)  # every rank evaluates the same windows (FSDP needs all of them)
                tracker.end_forward()
                total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum"))
                count += y.numel()
        finally:
            self.model.set_observer(self.tracker)
        if count == 0:
            raise UserError("the held-out split is too short for one evaluation window; lower train.seq_len")
        tracker.window = tracker.tokens_seen  # "dead" here: silent on every held-out token evaluated
        layers = tracker.layer_stats()
        return total / count, summarize(layers), [dataclasses.asdict(s) for s in layers]

    def run(self) -> TrainResult:
        tc = self.cfg.train
        progress = TrainProgress(tc.max_steps, self.step, self.console, enabled=self.cfg.logger.progress and self.dist.is_main)
        window_tokens, window_start, last_ce = 0, time.perf_counter(), math.nan
        heldout_ce = math.nan
        try:
            with progress:
                while self.step < tc.max_steps:
                    metrics = self.train_step()
                    last_ce = metrics["ce"]
                    window_tokens += tc.batch_size * tc.seq_len
                    if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                        elapsed = max(time.perf_counter() - window_start, 1e-9)
                        layer_stats = self.tracker.layer_stats()
                        metrics.update(summarize(layer_stats))
                        for i, ls in enumerate(layer_stats):
                            metrics[f"layer{i}/active_mean"] = ls.mean_active
                            metrics[f"layer{i}/active_max"] = ls.max_active
                            metrics[f"layer{i}/dead_fraction"] = ls.dead_fraction
                        metrics["tokens_per_s"] = window_tokens / elapsed
                        peak = take_peak_memory_gib(self.device)
                        if peak is not None:  # CUDA only: no such key on CPU
                            metrics["memory/peak_gib"] = peak
                        self.tracker.reset_window_stats()
                        window_tokens, window_start = 0, time.perf_counter()
                        if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.max_steps:
                            metrics["heldout_ce"] = self.evaluate()[0]
                        self.sink.log(self.step, metrics)
                        progress.update(self.step, metrics)
                    else:
                        progress.advance(self.step)
                    if tc.save_every and self.step % tc.save_every == 0 and self.step < tc.max_steps:
                        self.save()
        except KeyboardInterrupt:
            # The state after the last completed optimizer step is consistent: keep it so --resume continues.
            path = self.save()
            self.sink.close()
            raise UserError(f"interrupted at step {self.step}; checkpoint saved to {path}, continue with --resume") from None
        heldout_ce, sparsity, layers = self.evaluate()
        final = {"heldout_ce": heldout_ce, **{f"heldout_{k}": v for k, v in sparsity.items()}}
        self.sink.log(self.step, final)
        self.save()
        self.sink.close()
        return TrainResult(self.run_dir, self.step, last_ce, heldout_ce, sparsity, layers)
