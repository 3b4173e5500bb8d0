"""Which FFN implementation training runs: once per run (train.kernels) and, with the sparse op, per layer and step.

Per run, resolve_train_kernels() maps train.kernels to what runs:
  torch  every FFN on the dense torch path (nn.Linear).
  cuda   the sparse CUDA training op (kernels.train_reference.TRAIN_BACKENDS["cuda"]) on the layers the policy
         below picks, the dense path on the others. Needs a CUDA device, CuPy and compute capability ≥ 8.0
         (kernels.availability), bf16 compute (train.precision auto or bf16) and model.activation=relu; when
         any is missing the run stops before any work with a one-line UserError naming it.
  auto   cuda where it can run, else torch, with one line saying why.

Per layer, SparseLayerPolicy decides before each optimizer step from the statistics of the previous one
(SparsityTracker.step_mean_active: mean active neurons per token, reduced over all processes):
  - a dense layer goes sparse when its mean active count is at most SPARSE_CROSSOVER · H;
  - a sparse layer goes back to dense only above SPARSE_CROSSOVER · DENSE_HYSTERESIS · H, so a layer near the
    crossover does not flap between the two paths from one step to the next;
  - no statistics (the first step, the first step after a resume): every layer dense;
  - a sparse layer's ELL width (FeedForward.sparse_width) is ELL_WIDTH_PER_ACTIVE × its mean active count,
    rounded up to a multiple of ELL_WIDTH_MULTIPLE and clamped to [ELL_WIDTH_MIN, ELL_WIDTH_MAX]. Rows with more
    active neurons take the op's exact dense tail, so the width only moves work, never changes the result.
Both paths compute the same function (docs/TRAINING_KERNELS.md), so switching is safe at any step. The flags
change only between optimizer steps, never between the micro-batches of one, and the decision is a function of
the (already reduced) statistics and the policy's own history, so every data-parallel rank picks the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from sparsify_cli.errors import UserError
from sparsify_cli.kernels.availability import cuda_kernels_status
from sparsify_cli.model.ffn import FeedForward

# Mean active neurons per token, as a share of H, up to which a layer trains through the sparse op. From the
# training-FFN benchmark (BENCHMARKS.md, H100, D 2048, H 5632, M 16384, PERFORMANCE.md's skewed firing rates):
# fwd+bwd 1.76x/1.60x/1.59x/1.44x faster than dense at 0.5%/1%/2%/4% of H (the busiest neurons go through dense
# GEMMs: kernels/train_cuda.py HOT_RATE). 4% is the densest point measured, so it is the crossover used.
SPARSE_CROSSOVER = 0.04
# The sparse op has a fixed host cost per call (~60 launches and one host wait, ~1 ms): below this much FFN work
# per micro-batch (tokens × d_model × d_ffn) it loses to dense whatever the sparsity. Measured on the H100 with
# every FFN sparse (BENCHMARKS.md): the tiny recipe (2048 × 128 × 512 ≈ 1.3e8) trained at 0.5-0.6× the dense
# tokens/s, a 28-layer paper-shaped model at 4096 tokens (4.7e10) at 0.89×, at 16384 tokens (1.9e11) at 1.24×.
# The threshold sits between the last two (the crossover itself was not measured).
MIN_SPARSE_WORK = 1.0e11
# A sparse layer goes back to dense only above SPARSE_CROSSOVER × this (no flapping near the crossover).
DENSE_HYSTERESIS = 1.25
# ELL width of a sparse layer: about 3× its mean active count (rows above it take the exact dense tail), a
# multiple of 32 (a warp), within [64, 512].
ELL_WIDTH_PER_ACTIVE = 3.0
ELL_WIDTH_MULTIPLE = 32
ELL_WIDTH_MIN, ELL_WIDTH_MAX = 64, 512
# The TRAIN_BACKENDS entry the sparse layers run (tests give the policy "torch", the pure-torch reference).
SPARSE_BACKEND = "cuda"


# ---- per run -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainKernels:
    """What train.kernels resolved to for this run."""

    requested: str  # train.kernels: auto | torch | cuda
    resolved: str  # torch | cuda
    reason: str = ""  # why not cuda (auto that fell back to torch), else ""

    @property
    def note(self) -> str:
        """The line the run prints about it ("" for an explicit torch)."""
        if self.resolved == "cuda":
            return (
                f"train.kernels={self.requested}: sparse CUDA training op on the layers with at most "
                f"{100 * SPARSE_CROSSOVER:g}% of the FFN neurons active at the previous step, dense torch elsewhere"
            )
        return f"train.kernels=auto: dense torch FFNs ({self.reason})" if self.requested == "auto" else ""


def cuda_training_blocker(device: torch.device, precision: str, activation: str) -> Optional[str]:
    """Why the sparse CUDA training op cannot run in this run (one line), or None when it can."""
    if activation != "relu":
        return f"model.activation={activation}: the sparse op needs relu (it skips the ReLU's exact zeros)"
    if device.type != "cuda":
        if not torch.cuda.is_available():
            return cuda_kernels_status()[1]  # "no CUDA GPU is visible to torch ..."
        return f"train.device={device.type}: the op runs on a CUDA GPU"
    if precision == "fp32":
        return "train.precision=fp32: the sparse op computes in bf16 (use train.precision=auto or bf16)"
    ok, why = cuda_kernels_status()
    if not ok:
        return why
    return _load_sparse_op(SPARSE_BACKEND)


def _load_sparse_op(name: str) -> Optional[str]:
    """Load the op registered as `name` now (its module is imported on first use), so that a broken install stops
    the run here rather than at the first sparse step. Returns why it cannot load, or None."""
    from sparsify_cli.kernels import train_reference

    lookup = getattr(train_reference, "train_backend", None)  # imports a lazily registered backend's module
    try:
        if lookup is not None:
            lookup(name)
        elif name not in train_reference.TRAIN_BACKENDS:
            raise ValueError(f"no {name!r} in kernels.train_reference.TRAIN_BACKENDS")
    except Exception as exc:  # noqa: BLE001 - any failure to load it is the one-line reason
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"the CUDA training op does not load ({type(exc).__name__}: {first})"
    return None


def too_small_for_sparse(tokens_per_micro_batch: int, d_model: int, d_ffn: int) -> Optional[str]:
    """Why the sparse op cannot pay at this size (one line), or None: see MIN_SPARSE_WORK."""
    work = tokens_per_micro_batch * d_model * d_ffn
    if work >= MIN_SPARSE_WORK:
        return None
    return (f"the FFNs are too small for the sparse op to pay ({tokens_per_micro_batch} tokens × d_model {d_model} × "
            f"d_ffn {d_ffn} = {work:.2g} per micro-batch, below {MIN_SPARSE_WORK:.2g}: its fixed cost per call wins)")


def fit_to_size(kernels: TrainKernels, tokens_per_micro_batch: int, d_model: int, d_ffn: int
                ) -> tuple[TrainKernels, str]:
    """The run's kernels once the model's size is known (train.init may set it), and the line to print ("" for
    none): auto turns into torch when too_small_for_sparse says so; cuda stays cuda (the user asked), with a
    warning."""
    small = too_small_for_sparse(tokens_per_micro_batch, d_model, d_ffn) if kernels.resolved == "cuda" else None
    if not small:
        return kernels, ""
    if kernels.requested == "auto":
        fitted = TrainKernels(kernels.requested, "torch", small)
        return fitted, fitted.note
    return kernels, f"train.kernels=cuda: running the sparse op as asked, but {small}"


def resolve_train_kernels(requested: str, device: torch.device, precision: str, activation: str) -> TrainKernels:
    """train.kernels for a run on `device`: torch stays torch; cuda raises UserError when it cannot run; auto
    falls back to torch with the reason. (Once the model's size is known, fit_to_size may turn auto into torch.)"""
    if requested == "torch":
        return TrainKernels(requested, "torch")
    blocker = cuda_training_blocker(device, precision, activation)
    if blocker is None:
        return TrainKernels(requested, "cuda")
    if requested == "cuda":
        raise UserError(f"train.kernels=cuda cannot run: {blocker}; use train.kernels=auto or torch")
    return TrainKernels(requested, "torch", blocker)


# ---- per layer -----------------------------------------------------------------------------------------------


def ell_width(mean_active: float) -> int:
    """ELL width for a layer with this mean active count per token (module docstring)."""
    width = ELL_WIDTH_MULTIPLE * math.ceil(ELL_WIDTH_PER_ACTIVE * max(mean_active, 0.0) / ELL_WIDTH_MULTIPLE)
    return min(max(width, ELL_WIDTH_MIN), ELL_WIDTH_MAX)


@dataclass(frozen=True)
class LayerKernel:
    sparse: bool
    width: int = 0  # ELL width when sparse; 0 when dense


class SparseLayerPolicy:
    """Per-layer dense/sparse choice from the previous step's mean active counts (module docstring)."""

    def __init__(self, n_layers: int, d_ffn: int, backend: str = SPARSE_BACKEND,
                 crossover: float = SPARSE_CROSSOVER, hysteresis: float = DENSE_HYSTERESIS):
        if hysteresis < 1:
            raise ValueError(f"hysteresis must be >= 1; got {hysteresis}")
        self.d_ffn, self.backend = d_ffn, backend
        self.enter = crossover * d_ffn  # dense -> sparse at or below this mean active count
        self.leave = crossover * hysteresis * d_ffn  # sparse -> dense above this
        self.layers = [LayerKernel(False)] * n_layers

    def decide(self, mean_active: Optional[Sequence[float]]) -> list[LayerKernel]:
        """The layers' paths for the next step, given the previous step's per-layer mean active counts (None:
        no statistics, every layer dense). A NaN (a layer that saw no token) counts as no statistics."""
        if mean_active is None:
            self.layers = [LayerKernel(False)] * len(self.layers)
            return self.layers
        if len(mean_active) != len(self.layers):
            raise ValueError(f"{len(mean_active)} statistics for {len(self.layers)} layers")
        decided = []
        for prev, m in zip(self.layers, mean_active):
            sparse = m <= (self.leave if prev.sparse else self.enter)  # False for NaN
            decided.append(LayerKernel(True, ell_width(m)) if sparse else LayerKernel(False))
        self.layers = decided
        return decided

    def apply(self, ffns: Iterable[FeedForward]) -> int:
        """Set the current decisions on the model's FeedForward modules (the unwrapped model's: DDP and FSDP2
        run those same modules). Returns how many run sparse."""
        ffns = list(ffns)
        if len(ffns) != len(self.layers):
            raise ValueError(f"{len(ffns)} FFN modules for {len(self.layers)} layers")
        for ffn, choice in zip(ffns, self.layers):
            ffn.sparse_train = choice.sparse
            if choice.sparse:
                ffn.sparse_backend, ffn.sparse_width = self.backend, choice.width
        return sum(c.sparse for c in self.layers)

    def step(self, ffns: Iterable[FeedForward], mean_active: Optional[Sequence[float]]) -> int:
        """decide() then apply(); call between optimizer steps. Returns how many layers run sparse."""
        self.decide(mean_active)
        return self.apply(ffns)
